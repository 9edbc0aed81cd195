"""Tensor and state-tree codec: raw little-endian bytes and JSON, never pickle.

Encoding turns a nested state (mappings, lists, tuples, tensors, numpy arrays,
JSON scalars) into a JSON-able tree plus the raw bytes of every array. Decoding
validates every field it reads, so a malformed or hostile manifest gives a
:class:`~engram.errors.CorruptionError`, never an interpreter crash, an
arbitrary import, or an allocation the store's own data does not justify.
See :mod:`engram.store.format` for the layout.

Reading records needs no torch: only the functions that make or take tensors import it,
so the inspection commands (``engram ls``, ``show``, ``verify``...) start in a fraction of
the time ``import torch`` takes; :func:`numpy_values` gives a record's values through numpy
alone (``engram diff``). :class:`SampleIds` and :data:`TORCH_DTYPES` are built on first use
(a module ``__getattr__``).
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from engram.errors import CorruptionError, EncodingError
from engram.store.format import CHUNK_BYTES

if TYPE_CHECKING:
    import torch

if sys.byteorder != "little":  # pragma: no cover - no such CI machine
    raise ImportError("engram's store format is little-endian; big-endian hosts are unsupported")

# The only tensor dtypes a store may name, with their sizes in bytes: records are checked
# against this table without importing torch. Constant names, never from stored data.
TENSOR_ITEMSIZES: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint16": 2,
    "uint32": 4, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 4, "complex64": 8, "complex128": 16, "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}  # fmt: skip
_NUMPY_DTYPE_NAMES = (
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
)  # fmt: skip
NUMPY_DTYPES: dict[str, np.dtype] = {name: np.dtype(name) for name in _NUMPY_DTYPE_NAMES}
_NUMPY_ITEMSIZES = {name: dtype.itemsize for name, dtype in NUMPY_DTYPES.items()}

TAG_TENSOR = "__tensor__"
TAG_NDARRAY = "__ndarray__"
TAG_SAMPLES = "__samples__"
TAG_TUPLE = "__tuple__"
TAG_MAP = "__map__"
_TAGS = (TAG_TENSOR, TAG_NDARRAY, TAG_SAMPLES, TAG_TUPLE, TAG_MAP)
_ARRAY_TAGS = (TAG_TENSOR, TAG_NDARRAY, TAG_SAMPLES)


@functools.cache
def _torch_tables() -> tuple[dict[str, torch.dtype], dict[torch.dtype, str], frozenset]:
    """``(TORCH_DTYPES, dtype -> name, the dtypes numpy can view)`` of this torch."""
    import torch  # only for tensors: the inspection commands never build these tables

    dtypes = {name: getattr(torch, name) for name in TENSOR_ITEMSIZES if hasattr(torch, name)}
    # torch dtypes numpy has too: their bytes are viewed through numpy
    viewable = frozenset({
        torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
        torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128,
    })  # fmt: skip
    return dtypes, {dtype: name for name, dtype in dtypes.items()}, viewable


def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a validated record's dtype name."""
    dtype = _torch_tables()[0].get(name)
    if dtype is None:  # a store written by a newer torch than this one
        import torch  # only for tensors; already imported by _torch_tables

        raise CorruptionError(
            f"this torch ({torch.__version__}) has no dtype {name}; upgrade torch to load it"
        )
    return dtype


@functools.cache
def _sample_ids_class() -> type:
    """:class:`SampleIds`, defined on first use: its base class is ``torch.Tensor``."""
    import torch  # only for tensors: the inspection commands never define SampleIds

    class SampleIds(torch.Tensor):
        """An int64 tensor of replay-sample ids that a committed state references.

        Wrap a buffer's slot table in it (``SampleIds.of(ids)``) so ``gc`` keeps those
        samples (see :mod:`engram.store.samples`). It loads back as ``SampleIds``, so a
        loaded state committed again keeps its samples referenced.
        """

        __qualname__ = "SampleIds"  # importable as engram.store.codec.SampleIds

        @staticmethod
        def of(ids: Any) -> SampleIds:
            return torch.as_tensor(ids, dtype=torch.int64).reshape(-1).as_subclass(SampleIds)

    SampleIds.__module__ = __name__
    return SampleIds


_LAZY = {
    "SampleIds": _sample_ids_class,
    "TORCH_DTYPES": lambda: _torch_tables()[0],  # store dtype name -> torch.dtype
}


def __getattr__(name: str) -> Any:
    """:class:`SampleIds` and :data:`TORCH_DTYPES` import torch when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = _LAZY[name]()
    return value


MAX_DEPTH = 100  # deeper trees are refused: they are never real state, and recursion is bounded

# A list or tuple of only these (exact types: no bool-like int subclass) is encoded and
# decoded as it is, without a walk per item: Python's RNG state is a tuple of 625 ints,
# once per rank in a data-parallel version, and walking each item was most of the time
# encoding a small state took.
_PLAIN_ITEMS = frozenset({type(None), bool, int, float, str})


def plain(items: list | tuple) -> bool:
    """Whether ``items`` are all JSON scalars (a list or tuple kept as it is)."""
    return _PLAIN_ITEMS.issuperset(map(type, items))  # 4x a generator's all() here


MAX_NDIM = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")


def dtype_name(dtype: torch.dtype) -> str:
    """The store's name of a torch dtype (``"float32"``, ``"bfloat16"``, ...)."""
    name = _torch_tables()[1].get(dtype)
    if name is None:
        raise EncodingError(f"dtype {dtype} cannot be stored")
    return name


def checksum(data: Any) -> int:
    """Fast 64-bit checksum (XXH3) of a bytes-like object, checked on every load."""
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class Later:
    """A top-level value of a committed state that is produced late: ``produce()`` is
    called once the rest of the state is encoded and the model's checkpoint file is
    being written, so producing it (a data-parallel commit receiving the other ranks'
    parts) overlaps that write and its fsync. Replay samples it appends to
    ``store.samples`` are published with the version."""

    produce: Callable[[], Any]


@dataclass
class PendingArray:
    """An array found while encoding: its raw bytes and the record to complete."""

    raw: np.ndarray  # (nbytes,) uint8 view of the array's memory, C order, little-endian
    record: dict[str, Any]  # {"dtype", "shape", "chunks"}; "chunks" is filled in by the store


@dataclass
class Encoded:
    """A subtree already in :func:`encode_tree`'s form, its arrays' bytes in hand: what
    :func:`encoded_tree` gives for a validated tree received as bytes (a data-parallel
    rank's part). :func:`encode_tree` splices it in as it is, so a commit takes it with
    no decode into tensors and encode again.

    Its tree is encoded once: it is spliced into the one tree that encodes it.
    """

    tree: Any  # JSON-able; its array records' "chunks" are None until the store fills them
    arrays: list[PendingArray]
    samples: list[PendingArray]  # those of ``arrays`` that are SampleIds (int64 ids)
    depth: int  # of its deepest node below its root, as encode_tree and decode_tree count
    holes: list[tuple[Any, Any, tuple, Any]]  # (container, key, path, value): see put

    def put(self, path: Sequence[Any], value: Any) -> None:
        """Encode ``value`` at ``path`` (dict keys and list indices of the decoded tree),
        in place of the None there, when the tree is encoded: a tensor that encoding
        met already shares that record (one array, its bytes hashed once).

        Raises:
            CorruptionError: ``path`` does not lead to a None.
        """
        node: Any = self.tree
        slot: tuple[Any, Any] | None = None
        for key in path:
            # a plain dict's key (no tagged dict has one not starting "__"), else the rest
            if type(node) is dict and type(key) is str and key in node and key[:2] != "__":
                slot = node, key
            else:
                slot = _slot(node, key)
                if slot is None:
                    break
            node = slot[0][slot[1]]
        if slot is None or node is not None:
            raise CorruptionError(f"no value was left out at {list(path)!r} to fill")
        self.holes.append((*slot, tuple(path), value))

    def with_values(self, fn: Callable[[Any], Any]) -> Encoded:
        """This subtree with ``fn(value)`` put in place of each value :meth:`put` took
        (a background commit's staged copies); the two share the tree: encode one."""
        holes = [(container, key, path, fn(value)) for container, key, path, value in self.holes]
        return Encoded(self.tree, self.arrays, self.samples, self.depth, holes)


def _slot(node: Any, key: Any) -> tuple[Any, Any] | None:
    """Where the decoded tree's ``node[key]`` is held in the encoded ``node``: a
    (container, index) pair, or None if it is not there."""
    if isinstance(node, list):
        return (node, key) if type(key) is int and 0 <= key < len(node) else None
    if not isinstance(node, dict):
        return None
    if TAG_MAP in node:  # [key, value] pairs; decoding keeps the last of equal keys
        for pair in reversed(node[TAG_MAP]):
            if type(pair[0]) is type(key) and pair[0] == key:
                return pair, 1
        return None
    if len(node) == 1 and next(iter(node)) in _TAGS:  # an array, a tuple (validated)
        return None
    return (node, key) if isinstance(key, str) and key in node else None


def tensor_bytes(tensor: torch.Tensor, where: str = "") -> tuple[str, list[int], np.ndarray]:
    """Return ``(dtype_name, shape, raw)`` where ``raw`` is a uint8 view of the tensor's bytes.

    No copy is made for a contiguous CPU tensor; others are copied once.
    """
    import torch  # only for tensors: keeps the inspection commands light

    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        raise EncodingError(
            f"cannot store the {tensor.layout} tensor at {where or 'the top level'}: "
            "only dense (strided) tensors are supported; convert it with .to_dense()"
        )
    name = _torch_tables()[1].get(tensor.dtype)
    if name is None:
        raise EncodingError(f"cannot store a tensor of dtype {tensor.dtype} at {where!r}")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return name, list(tensor.shape), raw_view(t.contiguous())


def raw_view(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a flat uint8 numpy view (no copy)."""
    if t.numel() == 0:  # may carry stride 0, which view() rejects
        return np.empty(0, dtype=np.uint8)
    if t.dtype in _torch_tables()[2]:  # a numpy view is cheaper than torch's view chain
        return t.numpy().reshape(-1).view(np.uint8)
    import torch  # only for tensors; already imported by whoever made ``t``

    return t.reshape(-1).view(torch.uint8).numpy()  # bfloat16, float8: not in numpy


def ndarray_bytes(array: np.ndarray, where: str = "") -> tuple[str, list[int], np.ndarray]:
    """Like :func:`tensor_bytes` for a numpy array (numeric and bool dtypes only)."""
    dtype = array.dtype
    name = dtype.name if dtype.isnative or dtype.byteorder == "|" else dtype.newbyteorder("=").name
    if name not in NUMPY_DTYPES:
        raise EncodingError(
            f"cannot store a numpy array of dtype {dtype} at {where!r}: "
            "only bool, integer, float and complex arrays are supported"
        )
    arr = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[name])  # native = little-endian here
    return name, list(array.shape), arr.reshape(-1).view(np.uint8)


class SharedArrays:
    """The arrays already encoded for one version (see :func:`encode_tree`)."""

    def __init__(self) -> None:
        self.records: dict[int, tuple[Any, dict[str, Any], int]] = {}  # id -> value, record, n
        self.reused_bytes = 0  # of the places that reused a record


def encode_tree(obj: Any, shared: SharedArrays | None = None) -> tuple[Any, list[PendingArray]]:
    """Encode a nested state into a JSON-able tree and the arrays it references.

    The returned records' ``chunks`` fields are ``None`` until the caller fills them.
    Long because one recursive walk handles every value kind the format stores. An
    :class:`Encoded` value is spliced in as it is (its places filled).

    Args:
        shared: given (one for the calls encoding one version), a tensor or array
            object met again gets the record of its first place, not an array of its
            own: a data-parallel version holds every rank's all-reduced importances as
            rank 0's tensors. Only for stores, whose records name chunks; a packed wire
            message holds each record's bytes in place. With it the arrays are in no
            particular order (an :class:`Encoded` value's come as they are); without
            it, in the tree's order.

    Raises:
        EncodingError: a value is not a tensor, array, mapping, list, tuple or JSON
            scalar; the message names its path in the tree.
    """
    import torch  # only for tensors: encoding is a commit's work, never an inspection's

    sample_ids = _sample_ids_class()
    pending: list[PendingArray] = []

    def array_record(kind: str, enc: tuple[str, list[int], np.ndarray]) -> dict[str, Any]:
        name, shape, raw = enc
        record: dict[str, Any] = {"dtype": name, "shape": shape, "chunks": None}
        pending.append(PendingArray(raw, record))
        return {kind: record}

    def shared_record(kind: str, value: Any, path: str) -> dict[str, Any]:
        if shared is not None and id(value) in shared.records:
            _, record, nbytes = shared.records[id(value)]
            shared.reused_bytes += nbytes
            return {kind: record}
        enc = tensor_bytes(value, path) if kind == TAG_TENSOR else ndarray_bytes(value, path)
        out = array_record(kind, enc)
        if shared is not None:  # the value is kept, so its id is not reused meanwhile
            shared.records[id(value)] = (value, out[kind], len(enc[2]))
        return out

    def walk(value: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise EncodingError(f"state is nested deeper than {MAX_DEPTH} levels at {path!r}")
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, Encoded):
            return splice(value, path, depth)
        if isinstance(value, int | float):
            return int(value) if isinstance(value, int) else float(value)
        if isinstance(value, sample_ids):
            ids = value.as_subclass(torch.Tensor)
            if ids.dtype != torch.int64 or ids.dim() != 1:
                raise EncodingError(f"SampleIds at {path!r} must be a 1-d int64 tensor")
            return array_record(TAG_SAMPLES, tensor_bytes(ids, path))
        if isinstance(value, torch.Tensor):
            return shared_record(TAG_TENSOR, value, path)
        if isinstance(value, np.ndarray):
            return shared_record(TAG_NDARRAY, value, path)
        if isinstance(value, np.generic) and isinstance(value.item(), bool | int | float):
            return value.item()  # numpy scalars come back as Python numbers
        if isinstance(value, Mapping):
            return walk_mapping(value, path, depth)
        if isinstance(value, list):
            if plain(value):
                return list(value)
            return [walk(v, f"{path}/{i}", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, tuple):  # torch.Size included
            if plain(value):
                return {TAG_TUPLE: list(value)}
            return {TAG_TUPLE: [walk(v, f"{path}/{i}", depth + 1) for i, v in enumerate(value)]}
        raise EncodingError(
            f"cannot store a value of type {type(value).__qualname__} at {path or '/'!r}: "
            "a state may hold tensors, numpy arrays, dicts, lists, tuples, str, int, float, "
            "bool and None"
        )

    def walk_mapping(value: Mapping, path: str, depth: int) -> Any:
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: walk(v, f"{path}/{k}", depth + 1) for k, v in value.items()}
        pairs = []
        for k, v in value.items():
            if not (k is None or isinstance(k, bool | int | float | str)):
                raise EncodingError(
                    f"cannot store a dict key of type {type(k).__qualname__} at {path or '/'!r}:"
                    " keys must be str, int, float, bool or None"
                )
            pairs.append([k, walk(v, f"{path}/{k}", depth + 1)])
        return {TAG_MAP: pairs}

    def splice(value: Encoded, path: str, depth: int) -> Any:
        if depth + value.depth > MAX_DEPTH:
            raise EncodingError(f"state is nested deeper than {MAX_DEPTH} levels at {path!r}")
        if shared is not None or not value.holes:  # a store's: any order of arrays
            pending.extend(value.arrays)
            for container, key, where, hole in value.holes:
                inner = "".join(f"/{x}" for x in where)
                container[key] = walk(hole, f"{path}{inner}", depth + len(where))
            return value.tree
        # A packed message's bytes follow its header: one walk in the tree's order puts
        # its own arrays, and a filled place's, where they are.
        holes = {(id(c), k): (where, hole) for c, k, where, hole in value.holes}
        filled = {id(c) for c, *_ in value.holes}
        arrays = iter(value.arrays)

        def visit(node: Any) -> None:
            if isinstance(node, dict) and len(node) == 1:
                tag = next(iter(node))
                if tag in _ARRAY_TAGS:
                    pending.append(next(arrays))
                    return
                if tag in (TAG_TUPLE, TAG_MAP):  # a list: of items, of [key, value] pairs
                    node = node[tag]
            if isinstance(node, dict):
                children = list(node.items())
            elif isinstance(node, list) and (id(node) in filled or not plain(node)):
                children = list(enumerate(node))
            else:  # a scalar, or a list of them with no place filled (no array in it)
                return
            for k, v in children:
                if (id(node), k) in holes:
                    where, hole = holes[id(node), k]
                    inner = "".join(f"/{x}" for x in where)
                    node[k] = walk(hole, f"{path}{inner}", depth + len(where))
                else:
                    visit(v)

        visit(value.tree)
        return value.tree

    tree = walk(obj, "", 0)
    return tree, pending


@dataclass(frozen=True)
class ArrayRecord:
    """A validated array record from a manifest."""

    kind: str  # TAG_TENSOR, TAG_NDARRAY or TAG_SAMPLES
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: tuple[tuple[str, int, int], ...]  # (sha256 hex, nbytes, xxh3_64)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_array_record(kind: str, record: Any, where: str = "") -> ArrayRecord:
    """Validate an array record read from a (possibly hostile) manifest.

    Raises:
        CorruptionError: any field is missing, of the wrong type, or inconsistent.
    """

    def bad(why: str) -> CorruptionError:
        return CorruptionError(f"malformed tensor record at {where or '/'!r}: {why}")

    if not isinstance(record, dict) or set(record) != {"dtype", "shape", "chunks"}:
        raise bad("expected an object with keys dtype, shape, chunks")
    dtype, shape, chunks = record["dtype"], record["shape"], record["chunks"]
    itemsizes = _NUMPY_ITEMSIZES if kind == TAG_NDARRAY else TENSOR_ITEMSIZES
    if not isinstance(dtype, str) or dtype not in itemsizes:
        raise bad(f"unknown dtype {dtype!r}")
    if kind == TAG_SAMPLES and (dtype != "int64" or not isinstance(shape, list) or len(shape) != 1):
        raise bad("sample ids must be a 1-d int64 tensor")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise bad("shape must be a list of at most 64 dimensions")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise bad("shape entries must be non-negative integers")
    if math.prod(d for d in shape if d) > 2**62:  # an empty array may not claim 2**70 rows
        raise bad("shape is too large")
    nbytes = math.prod(shape) * itemsizes[dtype]
    if not isinstance(chunks, list) or len(chunks) != -(-nbytes // CHUNK_BYTES):
        raise bad(f"{nbytes} bytes need {-(-nbytes // CHUNK_BYTES)} chunks")
    parsed = []
    for i, chunk in enumerate(chunks):
        if not (isinstance(chunk, list) and len(chunk) == 3):
            raise bad(f"chunk {i} must be [sha256, nbytes, xxh3]")
        digest, size, check = chunk
        if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
            raise bad(f"chunk {i} has an invalid digest")
        expected = min(CHUNK_BYTES, nbytes - i * CHUNK_BYTES)
        if not _is_int(size) or size != expected:
            raise bad(f"chunk {i} should hold {expected} bytes")
        if not _is_int(check) or not 0 <= check < 2**64:
            raise bad(f"chunk {i} has an invalid checksum")
        parsed.append((digest, size, check))
    return ArrayRecord(kind, dtype, tuple(shape), nbytes, tuple(parsed))


def array_from_bytes(record: ArrayRecord, raw: torch.Tensor) -> torch.Tensor | np.ndarray:
    """Reinterpret a filled ``(nbytes,)`` uint8 tensor as the recorded array."""
    if record.kind == TAG_SAMPLES:
        import torch  # only for tensors; already imported by whoever made ``raw``

        return _sample_ids_class().of(raw.view(torch.int64))
    if record.kind != TAG_NDARRAY:
        return raw.view(_torch_dtype(record.dtype)).reshape(record.shape)
    return raw.numpy().view(NUMPY_DTYPES[record.dtype]).reshape(record.shape)


def numpy_values(dtype: str, shape: Sequence[int], raw: np.ndarray) -> np.ndarray:
    """The values of a stored array's ``(nbytes,)`` uint8 bytes as a numpy array, without
    torch (``engram diff``): a view for the dtypes numpy has; bfloat16 and the float8
    formats widened to float32, complex32 to complex64, each value exactly.

    Raises:
        CorruptionError: ``raw`` is not ``shape`` of ``dtype``.
    """
    nbytes = math.prod(shape) * TENSOR_ITEMSIZES.get(dtype, 0)
    if raw.dtype != np.uint8 or raw.shape != (nbytes,) or dtype not in TENSOR_ITEMSIZES:
        raise CorruptionError(f"{raw.nbytes} bytes are not a {dtype} array of shape {shape}")
    if dtype in NUMPY_DTYPES:
        values = raw.view(NUMPY_DTYPES[dtype])
    elif dtype == "bfloat16":  # the upper half of a float32
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif dtype == "complex32":  # (real, imaginary) float16 pairs
        values = raw.view(np.float16).astype(np.float32).view(np.complex64)
    else:
        values = _float8_table(dtype)[raw]
    return values.reshape(tuple(shape))


# name -> (exponent bits, mantissa bits, bias, encoding of the specials): "ieee" (all-ones
# exponent: inf, NaN), "fn" (no inf; all-ones exponent and mantissa: NaN), "fnuz" (no inf,
# no -0: 0x80 is NaN) or "e8m0" (an unsigned exponent alone; 0xFF is NaN).
_FLOAT8 = {
    "float8_e4m3fn": (4, 3, 7, "fn"),
    "float8_e4m3fnuz": (4, 3, 8, "fnuz"),
    "float8_e5m2": (5, 2, 15, "ieee"),
    "float8_e5m2fnuz": (5, 2, 16, "fnuz"),
    "float8_e8m0fnu": (8, 0, 127, "e8m0"),
}


@functools.cache
def _float8_table(dtype: str) -> np.ndarray:
    """The float32 value of each of the 256 codes of a float8 format (all exact)."""
    exp_bits, man_bits, bias, specials = _FLOAT8[dtype]
    code = np.arange(256)
    if specials == "e8m0":
        values = np.ldexp(1.0, code - bias)
        values[0xFF] = np.nan
        return _frozen(values.astype(np.float32))
    exponent = (code >> man_bits) & ((1 << exp_bits) - 1)
    fraction = (code & ((1 << man_bits) - 1)) / (1 << man_bits)
    magnitude = np.where(
        exponent == 0,
        np.ldexp(fraction, 1 - bias),  # subnormal
        np.ldexp(1.0 + fraction, exponent - bias),
    )
    values = np.where(code & 0x80, -magnitude, magnitude)
    if specials == "ieee":
        top = exponent == (1 << exp_bits) - 1
        values[top] = np.where(fraction[top] == 0, np.copysign(np.inf, values[top]), np.nan)
    elif specials == "fn":
        values[(code & 0x7F) == 0x7F] = np.nan
    else:
        values[0x80] = np.nan
    return _frozen(values.astype(np.float32))


def _frozen(table: np.ndarray) -> np.ndarray:
    table.flags.writeable = False  # cached: shared by every caller
    return table


def decode_tree(tree: Any, read_array: Callable[[ArrayRecord, str], Any]) -> Any:
    """Decode a tree produced by :func:`encode_tree`.

    Args:
        tree: the JSON-decoded tree.
        read_array: called with each validated record and its path; returns the array.

    Raises:
        CorruptionError: the tree is malformed (unknown tag, bad record, too deep).
    """
    return _validated(tree, read_array, tuple, dict)[0]


def encoded_tree(tree: Any, read_raw: Callable[[ArrayRecord, str], np.ndarray]) -> Encoded:
    """A JSON-decoded tree (hostile, perhaps) validated as :func:`decode_tree` validates
    it, kept in :func:`encode_tree`'s form: an :class:`Encoded` a commit splices in.

    Its records are new ones (dtype and shape validated, ``chunks`` None): nothing but
    validated values passes into the tree. ``read_raw(record, path)`` gives each array's
    ``(nbytes,)`` uint8 bytes (a view of the received message, say).

    Raises:
        CorruptionError: the tree is malformed (unknown tag, bad record, too deep).
    """
    arrays: list[PendingArray] = []
    samples: list[PendingArray] = []

    def pend(record: ArrayRecord, path: str) -> dict[str, Any]:
        fresh = {"dtype": record.dtype, "shape": list(record.shape), "chunks": None}
        arrays.append(PendingArray(read_raw(record, path), fresh))
        if record.kind == TAG_SAMPLES:
            samples.append(arrays[-1])
        return {record.kind: fresh}

    def as_tuple(items: Any) -> dict[str, list]:
        return {TAG_TUPLE: list(items)}

    def as_map(pairs: list[tuple[Any, Any]]) -> dict[str, list]:
        return {TAG_MAP: [list(pair) for pair in pairs]}

    out, depth = _validated(tree, pend, as_tuple, as_map)
    return Encoded(out, arrays, samples, depth, [])


def _validated(
    tree: Any,
    on_array: Callable[[ArrayRecord, str], Any],
    as_tuple: Callable[[Any], Any],
    as_map: Callable[[list[tuple[Any, Any]]], Any],
) -> tuple[Any, int]:
    """The walk of :func:`decode_tree` and :func:`encoded_tree`: every node validated,
    arrays given to ``on_array``, tuples to ``as_tuple`` and non-str-keyed mappings (as
    pairs) to ``as_map``; returns the result and the depth of the deepest node."""
    deepest = 0

    def walk(node: Any, path: str, depth: int) -> Any:
        nonlocal deepest
        if depth > deepest:
            if depth > MAX_DEPTH:
                raise CorruptionError(f"state tree is nested deeper than {MAX_DEPTH} at {path!r}")
            deepest = depth
        if node is None or isinstance(node, bool | int | float | str):
            return node
        if isinstance(node, list):
            if plain(node):
                return list(node)
            return [walk(v, f"{path}/{i}", depth + 1) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise CorruptionError(f"unexpected JSON value at {path!r}")
        tagged = [k for k in node if k.startswith("__")]
        if not tagged:
            return {k: walk(v, f"{path}/{k}", depth + 1) for k, v in node.items()}
        if len(node) != 1 or tagged[0] not in _TAGS:
            raise CorruptionError(f"unknown tagged value {tagged[0]!r} at {path!r}")
        tag, body = tagged[0], node[tagged[0]]
        if tag in _ARRAY_TAGS:
            return on_array(parse_array_record(tag, body, path), path)
        if not isinstance(body, list):
            raise CorruptionError(f"{tag} at {path!r} must hold a list")
        if tag == TAG_TUPLE:
            if plain(body):
                return as_tuple(body)
            return as_tuple([walk(v, f"{path}/{i}", depth + 1) for i, v in enumerate(body)])
        pairs = []
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise CorruptionError(f"{TAG_MAP} at {path!r} must hold [key, value] pairs")
            key, value = pair
            if not (key is None or isinstance(key, bool | int | float | str)):
                raise CorruptionError(f"invalid dict key at {path!r}")
            pairs.append((key, walk(value, f"{path}/{key}", depth + 1)))
        return as_map(pairs)

    return walk(tree, "", 0), deepest


def iter_array_records(tree: Any) -> list[ArrayRecord]:
    """All array records of a tree (validated), without reading any bytes."""
    found: list[ArrayRecord] = []

    def collect(record: ArrayRecord, path: str) -> None:
        found.append(record)

    decode_tree(tree, collect)
    return found
