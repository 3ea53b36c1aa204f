"""Import mdf_taxonomy.kernels without the package __init__ (which pulls in Ray & co.,
absent on the GPU machine): the GPU scripts import this module first."""

import os
import sys
import types

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
_pkg = types.ModuleType("mdf_taxonomy")
_pkg.__path__ = [os.path.join(ROOT, "mdf_taxonomy")]
sys.modules.setdefault("mdf_taxonomy", _pkg)
