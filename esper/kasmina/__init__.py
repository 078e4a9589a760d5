"""Kasmina: seed slots inside the host model (lifecycle, alpha blending, gradient isolation).

Pure library: no network, no bus, no service imports; CuPy is imported only when a CUDA
tensor reaches the fused blend.
"""

from esper.kasmina.alpha import AlphaController, AlphaCurve, AlphaDirection, ScheduleUnit
from esper.kasmina.config import KasminaConfig
from esper.kasmina.events import KasminaEvent, SlotHealthData
from esper.kasmina.model import MorphogeneticModel, wrap
from esper.kasmina.sites import Site, SlotKind
from esper.kasmina.slot import SeedSlot
from esper.kasmina.stages import SeedStage

__all__ = [
    "AlphaController",
    "AlphaCurve",
    "AlphaDirection",
    "KasminaConfig",
    "KasminaEvent",
    "MorphogeneticModel",
    "ScheduleUnit",
    "SeedSlot",
    "SeedStage",
    "Site",
    "SlotHealthData",
    "SlotKind",
    "wrap",
]
