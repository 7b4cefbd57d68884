"""The objective zoo: one module per family; importing this package registers every built-in objective.

=====================  ===========================================  ==================
family (module)        registered names                             class
=====================  ===========================================  ==================
``minirl``             minirl, minirl-no-clip, minirl-length-norm,   :class:`MiniRL`
                       minirl-no-is
``grpo``               grpo, dr-grpo, dapo, dual-clip-ppo,          :class:`GRPO`
                       bnpo, luspo
``cispo``              cispo                                        :class:`CISPO`
``gspo``               gspo, gspo-token                             :class:`GSPO`
``gpg``                gpg                                          :class:`GPG`
``cov``                clip-cov, kl-cov                             :class:`ClipCov`, :class:`KLCov`
``gmpo``               gmpo                                         :class:`GMPO`
``dppo``               dppo-tv, dppo-kl                             :class:`DPPO`
``sapo``               sapo                                         :class:`SAPO`
``vespo``              vespo                                        :class:`VESPO`
``topr``               topr                                         :class:`TOPR`
``raft``               raft++                                       :class:`GRPO`
``ipo``                prime-ipo, ipo                               :class:`PrimeIPO`
``tinker``             importance-sampling, cross-entropy           :class:`ImportanceSampling`, :class:`CrossEntropy`
``dro``                dro, kimi15                                  :class:`DRO`
``decoupled``          decoupled-ppo, m2po                          :class:`DecoupledPPO`, :class:`M2PO`
``corrected``          icepop, seq-mask-tis                         :class:`GRPO`
``astar_po``           a-star-po, a2po                              :class:`AStarPO`
=====================  ===========================================  ==================

Variants are registrations of one class with default overrides, never copies (see each module's docstring for the
exact formula, paper and reductions). A family implements its policy term; :meth:`Objective.compute` applies the
correction, the loss-shaping options of :mod:`pgzoo.objectives.shaping` (KL estimator, entropy and off-policy
masks, entropy bonus; every family takes them) and the aggregation, once.
"""

from pgzoo.objectives import corrected, raft  # noqa: F401  (GRPO variants: icepop, seq-mask-tis, raft++)
from pgzoo.objectives.astar_po import AStarPO
from pgzoo.objectives.base import AGGREGATIONS, Objective, ObjectiveOutput, aggregate
from pgzoo.objectives.cispo import CISPO
from pgzoo.objectives.cov import ClipCov, KLCov
from pgzoo.objectives.decoupled import M2PO, DecoupledPPO
from pgzoo.objectives.dppo import DPPO
from pgzoo.objectives.dro import DRO
from pgzoo.objectives.gmpo import GMPO
from pgzoo.objectives.gpg import GPG
from pgzoo.objectives.grpo import GRPO
from pgzoo.objectives.gspo import GSPO
from pgzoo.objectives.ipo import PrimeIPO
from pgzoo.objectives.minirl import MiniRL
from pgzoo.objectives.sapo import SAPO
from pgzoo.objectives.shaping import Shaping
from pgzoo.objectives.tinker import CrossEntropy, ImportanceSampling
from pgzoo.objectives.topr import TOPR
from pgzoo.objectives.vespo import VESPO

__all__ = ["AGGREGATIONS", "Objective", "ObjectiveOutput", "aggregate", "MiniRL", "GRPO", "CISPO", "GSPO",
           "GPG", "ClipCov", "KLCov", "GMPO", "DPPO", "SAPO", "VESPO", "Shaping", "TOPR", "PrimeIPO",
           "ImportanceSampling", "CrossEntropy", "DRO", "DecoupledPPO", "M2PO",
           "AStarPO"]
