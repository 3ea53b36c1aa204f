"""The parameters, declared once, in the spirit of scikit-learn's KMeans.

Two tables: `PARAMETER_CONSTRAINTS` for what decides the tree (TaxonomyConfig) and
`RUN_PARAMETER_CONSTRAINTS` for how the passes run (RunConfig: workers, device,
dtype, buckets, flushes, cache), which changes no bit of the tree. Each parameter
has its name, default, constraint and help here; the engine, the CLI and the
operators take them from here, and a value that would fail at run time, after
minutes of streaming, is refused when the object is built, naming the parameter.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from mdf_taxonomy.kernels import CENTROID_SEARCHES, KERNEL_BACKENDS, METRICS
from mdf_taxonomy.model.constraints import (
    Bool,
    Constraint,
    Device,
    FiniteAtLeast,
    Identifier,
    Int,
    NonEmptyStr,
    OneOf,
    OrNone,
    PerLevel,
)

MAX_LEVELS = 64
MAX_BRANCHING = 2**24
MAX_ITER = 10**6
#: Sample rows per node; under fitting.MAX_ROWS_PER_SUM, so in-memory sums of a sample are
#: exact, and small enough to hold on the driver.
MAX_SAMPLE = 2**20
MAX_DIM = 2**24
SEED_LIMIT = 2**63  # seeds feed numpy's and torch's generators, which take [0, 2**63)


PARAMETER_CONSTRAINTS: dict[str, Constraint] = {
    "n_levels": Int(1, MAX_LEVELS),
    "branching_factor": PerLevel(Int(1, MAX_BRANCHING)),
    "dim": OrNone(Int(1, MAX_DIM)),
    "metric": OneOf(METRICS),
    "seed": Int(0, SEED_LIMIT - 1),
    "max_iter": Int(1, MAX_ITER),
    "tol": FiniteAtLeast(0.0),
    "sample_per_child": Int(1, MAX_SAMPLE),
    "max_sample_per_node": Int(1, MAX_SAMPLE),
    "init_iters": Int(0, MAX_ITER),
    "max_node_size": OrNone(Int(1, 2**62 - 1)),
    "min_node_size": OrNone(Int(1, 2**62 - 1)),
    "balance_factor": OrNone(FiniteAtLeast(1.0)),
    "centroid_search": OneOf(CENTROID_SEARCHES),
    "coarse_min_children": Int(1, MAX_BRANCHING),
    "coarse_probe": Int(1, 2**16),
    "embedding_field": OrNone(NonEmptyStr()),
}


@dataclass(frozen=True)
class TaxonomyConfig:
    """Everything that decides the shape of the tree; two fits with equal configs,
    equal data and equal seeds give the same tree bit for bit.

    Parameters
    ----------
    n_levels : int, default=1
        Depth of the tree.
    branching_factor : int or list of int, default=16
        Children per node, one number for every level or one per level.
    dim : int or None, default=None
        Embedding length (None: the majority length of the first rows read).
    metric : {'l2', 'cosine'}, default='l2'
        'l2' (squared Euclidean) or 'cosine' (rows are L2-normalised first).
    seed : int, default=0
        Decides the init samples and k-means++ draws.
    max_iter : int, default=20
        Lloyd passes per level at most.
    tol : float, default=1e-4
        A level stops when the relative drop of inertia between passes is below it.
    sample_per_child : int, default=64
        Init sample rows per child (bottom-k by content hash, so the sample does not
        depend on batch or file order); capped by max_sample_per_node.
    max_sample_per_node : int, default=65536
        The cap on a parent's init sample.
    init_iters : int, default=10
        Lloyd iterations run in memory on the sample after k-means++.
    max_node_size : int or None, default=None
        Balance: a parent of S rows gets max(branching, ceil(S / max_node_size)) children.
    min_node_size : int or None, default=None
        Nodes of fewer rows are flagged in the history as undersized (never merged).
    balance_factor : float or None, default=None
        Balance: a parent of S rows, over balance_factor x the median size M of its
        siblings, gets ceil(branching x S / (balance_factor x M)) children.
    centroid_search : {'exact', 'coarse'}, default='exact'
        'coarse': approximate search of big parents by an index (kernels.coarse_search).
    coarse_min_children : int, default=65536
        Children from which centroid_search='coarse' searches a parent by its index.
    coarse_probe : int, default=8
        Index cells the coarse search reads per row (more: slower, nearer to exact).
    embedding_field : str or None, default=None
        The input column holding the vectors (None: the one column of float vectors,
        found in the input's schema or the first batch's records and logged; none or
        several is an error listing the candidates).
    extra : dict, default={}
        Annotations carried with the object; not compared, not stored, no effect on the fit.
    """

    n_levels: int = 1
    branching_factor: int | tuple[int, ...] = 16
    dim: int | None = None
    metric: str = "l2"
    seed: int = 0
    max_iter: int = 20
    tol: float = 1e-4
    sample_per_child: int = 64
    max_sample_per_node: int = 65536
    init_iters: int = 10
    max_node_size: int | None = None
    min_node_size: int | None = None
    balance_factor: float | None = None
    centroid_search: str = "exact"
    coarse_min_children: int = 65536
    coarse_probe: int = 8
    embedding_field: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.branching_factor, list):
            object.__setattr__(self, "branching_factor", tuple(self.branching_factor))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first parameter outside its constraint."""
        for name, rule in PARAMETER_CONSTRAINTS.items():
            value = getattr(self, name)
            if not rule.ok(value):
                raise ValueError(f"TaxonomyConfig.{name}={value!r}: {rule}")
        bf = self.branching_factor
        if isinstance(bf, tuple) and len(bf) != self.n_levels:
            raise ValueError(
                f"TaxonomyConfig.branching_factor={bf!r}: a list must have one "
                f"entry per level ({self.n_levels})"
            )

    def branching(self, level: int) -> int:
        """Children per node at `level` (1-based)."""
        bf = self.branching_factor
        return bf[level - 1] if isinstance(bf, tuple) else bf

    def sample_size(self, level: int) -> int:
        return min(self.max_sample_per_node, self.sample_per_child * self.branching(level))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        if isinstance(d["branching_factor"], tuple):
            d["branching_factor"] = list(d["branching_factor"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaxonomyConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown taxonomy parameter(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def same_tree(self, other: TaxonomyConfig) -> bool:
        """True when `other` describes the same fit (so a stored fit may be resumed)."""
        return self.to_dict() == other.to_dict()


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
ON_BAD_FILE = ("fail", "skip")
RUN_PARAMETER_CONSTRAINTS: dict[str, Constraint] = {
    "batch_size": Int(1, 2**24),
    "num_replicas": Int(1, 4096),
    "num_loaders": Int(1, 4096),
    "cpus_per_replica": OrNone(FiniteAtLeast(0.0)),
    "gpus_per_replica": FiniteAtLeast(0.0),
    "backend_buckets": Int(1, 4096),
    "flush_rows": Int(0, 2**40),
    "device": Device(),
    "kernel_backend": OneOf(KERNEL_BACKENDS),
    "compute_dtype": OneOf(COMPUTE_DTYPES),
    "cache_bytes": OrNone(Int(0, 2**62)),
    "columnar": Bool(),
    "on_bad_file": OneOf(ON_BAD_FILE),
    "max_pass_retries": Int(0, 100),
}


#: What labelling writes, besides the tree: the operators' and the engine's output names.
LABEL_PARAMETER_CONSTRAINTS: dict[str, Constraint] = {"field_prefix": Identifier()}


def check_parameter(name: str, value: Any, where: str) -> None:
    """Raise ValueError unless `value` meets the run, label or fit constraint of `name`."""
    rule = (
        RUN_PARAMETER_CONSTRAINTS.get(name)
        or LABEL_PARAMETER_CONSTRAINTS.get(name)
        or PARAMETER_CONSTRAINTS[name]
    )
    if not rule.ok(value):
        raise ValueError(f"{where}: {name}={value!r}: {rule}")


@dataclass(frozen=True)
class RunConfig:
    """How the passes run; none of it changes a bit of the tree.

    Parameters
    ----------
    batch_size : int, default=1024
        Records per batch on MDF's Executor (the columnar pass reads whole Parquet row
        groups; the in-process curation passes at least 2^22 values a batch).
    num_replicas : int, default=1
        Columnar workers (1: in this process, no Ray) or stage replicas.
    num_loaders : int, default=1
        MDF loader actors (the operator path).
    cpus_per_replica : float or None, default=None
        Ray CPUs of each worker or replica (None: the cores left after the loaders,
        shared out).
    gpus_per_replica : float, default=0
        Ray GPUs of each worker or replica.
    backend_buckets : int, default=2
        Bucket actors holding a pass's partials (the operator path).
    flush_rows : int, default=65536
        Rows of partials folded in a replica before a flush (operator path).
    device : str, default='auto'
        'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'.
    kernel_backend : {'auto', 'torch', 'triton'}, default='auto'
        'auto' (Triton on CUDA), 'torch' or 'triton'.
    compute_dtype : {'float32', 'bfloat16', 'float16'}, default='float32'
        What the kernels read (bfloat16/float16 halve the bytes on GPUs).
    cache_bytes : int or None, default=None
        Decoded rows a columnar worker keeps across passes (None: half the GPU's free
        memory or a quarter of the host's; 0: stream every pass).
    columnar : bool, default=True
        Run passes as columnar passes where the pipeline allows; False runs every pass
        through MDF's Executor and the operators, record by record.
    on_bad_file : {'fail', 'skip'}, default='fail'
        'fail' or 'skip' an unreadable input file or row group.
    max_pass_retries : int, default=2
        Times a pass that lost rows is run again.
    """

    batch_size: int = 1024
    num_replicas: int = 1
    num_loaders: int = 1
    cpus_per_replica: float | None = None
    gpus_per_replica: float = 0
    backend_buckets: int = 2
    flush_rows: int = 65536
    device: str = "auto"
    kernel_backend: str = "auto"
    compute_dtype: str = "float32"
    cache_bytes: int | None = None
    columnar: bool = True
    on_bad_file: str = "fail"
    max_pass_retries: int = 2

    def __post_init__(self) -> None:
        for name in RUN_PARAMETER_CONSTRAINTS:
            check_parameter(name, getattr(self, name), "RunConfig")


def parameter_docs(cls: type) -> dict[str, tuple[str, str]]:
    """Each parameter's `name : type, default=...` spec and its meaning, read from the
    numpydoc entries of the class docstring, so the docs are the one source of the help."""
    out: dict[str, tuple[str, str]] = {}
    name, indent = None, 0
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        text = line.strip()
        depth = len(line) - len(line.lstrip())
        if name is not None and text and depth > indent:
            spec, meaning = out[name]
            out[name] = (spec, f"{meaning} {text}".lstrip())
        elif entry := _DOC_ENTRY.fullmatch(text):
            name, indent = entry[1], depth
            out[name] = (entry[2], "")
        else:
            name = None
    return out


def parameter_help(cls: type) -> dict[str, str]:
    """Each parameter's meaning, from the class docstring (see parameter_docs)."""
    return {name: meaning for name, (_, meaning) in parameter_docs(cls).items()}


_DOC_ENTRY = re.compile(r"([A-Za-z_]\w*) : (\S.*)")


def document_table_parameters(cls: type, extra: Collection[str] = ()) -> None:
    """Complete ``cls``'s numpydoc Parameters with the tables' own entries (TaxonomyConfig's,
    RunConfig's) for each ``__init__`` parameter that neither ``cls`` nor a base documents,
    with the default of ``cls``'s signature, then for ``extra`` table parameters it takes by
    keyword: a face restates no table entry, so the meaning is written once."""
    documented: dict[str, tuple[str, str]] = {}
    for base in reversed(cls.__mro__):
        documented.update(parameter_docs(base))
    own = parameter_docs(cls)
    tables = {**parameter_docs(TaxonomyConfig), **parameter_docs(RunConfig)}
    entries = []
    signature = inspect.signature(cls).parameters
    for p in signature.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in own:
            continue
        spec, meaning = documented.get(p.name) or tables[p.name]
        kind = spec.split(", default=")[0]
        default = "" if p.default is p.empty else f", default={p.default!r}"
        entries.append((p.name, kind + default, meaning))
    entries += [(n, *tables[n]) for n in tables if n in extra and n not in signature]
    lines = [(cls.__doc__ or "").rstrip()]
    for name, spec, meaning in entries:
        lines.append(f"    {name} : {spec}")
        lines += textwrap.wrap(meaning, 88, initial_indent=" " * 8, subsequent_indent=" " * 8)
    cls.__doc__ = "\n".join(lines) + "\n"
