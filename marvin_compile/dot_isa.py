"""x86 dot-product instructions as TVM tensor intrinsics, and which family a target has.

Each intrinsic computes ``C[i] += sum_k A[k] * B[i, k]`` for one vector of output channels
(``lanes``) and a short reduction (``depth``): the shape of one instruction. An integer ``A`` (the
broadcast activation) comes as one int32 word of its ``depth`` elements (``lane_of``), the way the
instruction reads it: the packing then builds whole words in vectors instead of storing elements
one by one. Each also has a pixel-lane form (name suffix ``ROWS``), ``C[i] += sum_k A[i, k] *
B[k]``: a vector of ``lanes`` activation words (one pixel each) against one broadcast weight word.

- ``avx512_vnni``: int8 ``vpdpbusd`` (u8 x s8, depth 4: the activation carries a +128 offset that
  the kernel subtracts again) and int16 ``vpdpwssd`` (depth 2), 16 lanes;
- ``avx512``: int16 ``vpmaddwd`` + add, 16 lanes (signed int8 runs widened to int16);
- ``avx2``: int16 ``vpmaddwd`` + add, 8 lanes (signed int8 runs widened to int16);
- every integer family: int8 weights against a *non-negative* int8 activation (a ReLU's output,
  container ``"uint8"``), depth 4, with no offset: ``vpdpbusd`` on VNNI, elsewhere ``vpmaddubsw``
  (u8 x s8 pairs into int16) then ``vpmaddwd`` by ones (pairs into int32) and an add. The int16
  pair sums cannot saturate: 2 * 127 * 128 < 2**15. On Zen 3 this chain measured 95 GMAC/s a core
  against 75 for ``vpmaddwd`` + add and 44 for float32 FMA (broadcast operand from memory);
  - with int16 sums (``int16_sums``, a deployed layer whose constant weights keep every pair lane's
    sum inside int16, ``te_dot.int16_sums_fit``): ``vpmaddubsw`` then a wrapping ``vpaddw`` into
    int16 accumulators, each lane the running sum of one pair position; the kernel's unpacking adds
    the two halves in int32. One multiply a step, not two: ResNet-20's int8 layers at batch 64 took
    0.66-0.75x the time. A deployed int8 layer whose input may be negative takes this form too where
    its weights allow it with inputs up to 255, its activation packed as ``x + 128``
    (``BIASED_INT8``, as for vpdpbusd), instead of widening to int16 (LeNet-5's conv1);
- every family: float32 ``vfmadd`` (depth 1) for the float32 class, and float64 ``vfmadd`` for
  int16 products above the int32 bound: integer-valued float64 sums are exact below 2**53, i.e.
  for any reduction shorter than 2**23 of products of at most 2**30.

Integer arithmetic wraps modulo 2**32, so the result is exact whenever the true sum fits in int32.
The kernels keep ``C`` in a small per-tile buffer that LLVM promotes to registers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import platform
from dataclasses import dataclass

import tvm
from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

from marvin_compile.tvmscript import fast_parsing


@dataclass(frozen=True)
class DotISA:
    """One instruction family: how operands are packed and which intrinsic reduces them."""

    name: str
    lanes: int  # output channels per instruction (int32 lanes)
    amx: bool = False  # AMX-INT8 tiles usable: conv/matmul products run on them where they suit (``amx``)

    def depth(self, container: str) -> int:
        """Reduction elements per lane per instruction for a container (``float64``: the exact
        wide product of int16 operands; ``uint8``: a non-negative int8 activation)."""
        if container in FLOATS:
            return 1
        return 4 if container == "uint8" or self.offset(container) else 2

    def offset(self, container: str) -> bool:
        """Whether the packed activation is ``x + 128``: vpdpbusd's unsigned operand for a signed
        int8 activation, or the byte chain's (``BIASED_INT8``); the kernel subtracts ``128 *
        sum(w)`` again."""
        return (self.name == "avx512_vnni" and container == "int8") or container == BIASED_INT8

    def operand_dtype(self, container: str) -> str:
        """The dtype the packed activation holds (uint8: offset for vpdpbusd, or non-negative)."""
        return container if container in FLOATS else {2: "int16", 4: "uint8"}[self.depth(container)]

    def weight_dtype(self, container: str) -> str:
        return container if container in FLOATS else {2: "int16", 4: "int8"}[self.depth(container)]

    def product_dtype(self, container: str) -> str:
        """The dtype the instruction accumulates in."""
        return container if container in FLOATS else "int32"

    def pairs_in_int16(self, container: str) -> bool:
        """Whether the byte chain (``vpmaddubsw``) computes this container's products: its int16
        pair sums can then accumulate in int16 (``int16_sums``) where the weights allow."""
        return container in ("uint8", BIASED_INT8) and f"marvin_dot_{self.name}_4" in BYTES

    def intrinsic(
        self, container: str, index: str = "int32", rows: bool = False, int16_sums: bool = False
    ) -> str:
        """The registered tensor intrinsic's name (registered on first use) for a kernel whose
        loops are ``index`` (int64 over a symbolic batch); ``rows``: its pixel-lane form;
        ``int16_sums``: the byte chain accumulating its pair sums in int16."""
        if int16_sums and not self.pairs_in_int16(container):
            raise ValueError(f"{self.name} has no int16-sum kernel for {container}")
        suffix = "f64" if container == "float64" else self.depth(container)
        name = f"marvin_dot_{self.name}_{suffix}{PAIRS if int16_sums else ''}"
        if container not in FLOATS:
            name = f"{name}_{index}"
        if rows:
            name = f"{name}{ROWS}"
        _register(name)
        return name


FLOATS = ("float32", "float64")
# a signed int8 activation as the byte chain's unsigned operand, x + 128: only with int16 sums, whose
# weight check also bounds each pair sum (255 * 128 * 2 would saturate ``vpmaddubsw``)
BIASED_INT8 = "int8+128"
ISAS = {
    "avx512_vnni": DotISA("avx512_vnni", 16),
    "avx512": DotISA("avx512", 16),
    "avx2": DotISA("avx2", 8),
}


def dot_isa(target: tvm.target.Target) -> DotISA | None:
    """The best integer dot-product family of an LLVM x86 target (None elsewhere)."""
    if target.kind.name != "llvm" or not str(target.attrs.get("mcpu", "")):
        return None

    def has(feature: str) -> bool:
        return bool(codegen.target_has_features(feature, target))

    if has("avx512vnni") and has("avx512bw"):
        amx = has("amx-tile") and has("amx-int8") and amx_enabled() and os_grants_amx()
        return dataclasses.replace(ISAS["avx512_vnni"], amx=amx)
    if has("avx512bw"):
        return ISAS["avx512"]
    if has("avx2") and has("fma"):
        return ISAS["avx2"]
    return None


SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18


def amx_enabled() -> bool:
    """``MARVIN_AMX=0`` keeps the integer classes on the AVX-512 kernels (to compare, or to build
    for a machine whose OS refuses AMX)."""
    value = os.environ.get("MARVIN_AMX", "1")
    if value not in ("0", "1"):
        raise ValueError(f"MARVIN_AMX must be 0 or 1, got {value!r}")
    return value == "1"


@functools.cache
def os_grants_amx() -> bool:
    """Whether this (Linux x86-64) process may use AMX tiles: Linux hands out tile state only on
    request (``arch_prctl``), once per process."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0


def lane_of(word, p, a_dtype: str):
    """Element ``p`` of an int32 ``word`` of ``a_dtype`` elements (element 0 in the low bits), as
    int32: how a kernel reads its packed activation (``te_dot.pack_word``)."""
    bits = tvm.DataType(a_dtype).bits
    return tirx.Cast("int32", tirx.Cast(a_dtype, tirx.shift_right(word, p * bits)))


def int16_lanes_add(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """Two int32 words added as two int16 halves, each wrapping on its own (``vpaddw``): the
    combiner of ``int16_sums``. No int32 add here can overflow."""
    low = tirx.const(0xFFFF, "int32")
    high = (tirx.shift_right(a, 16) + tirx.shift_right(b, 16)) << 16
    return (((a & low) + (b & low)) & low) | high


def int16_pair_word(first: tirx.PrimExpr, second: tirx.PrimExpr) -> tirx.PrimExpr:
    """The int32 word of two int16 values, ``first`` in the low half (as ``vpmaddubsw`` leaves two
    neighbouring pair sums)."""
    return (first & tirx.const(0xFFFF, "int32")) | (second << 16)


def int16_word_sum(word: tirx.PrimExpr) -> tirx.PrimExpr:
    """The sum of a word's two int16 halves, in int32."""
    return tirx.shift_right(word << 16, 16) + tirx.shift_right(word, 16)


def _shapes(lanes: int, depth: int, rows: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (A, B) buffer shapes of an intrinsic: the channel-lane form broadcasts one word of A
    against ``lanes`` rows of B; the pixel-lane form (``rows``) reads a word of A per lane (one
    pixel each) against B's one broadcast word (one output channel)."""
    return ((lanes,), (depth,)) if rows else ((1,), (lanes, depth))


def _whole(buffer: tirx.Buffer) -> tirx.BufferRegion:
    return tirx.BufferRegion(buffer, [tvm.ir.Range(0, d) for d in buffer.shape])


def _desc(lanes: int, depth: int, a_dtype: str, b_dtype: str, index: str, rows: bool):
    """``index``: the loops' dtype. A kernel over a symbolic batch has int64 loops, and TVM widens
    the word to int64 for ``lane_of``'s shift there: the pattern has to say so to match."""
    a_shape, b_shape = _shapes(lanes, depth, rows)

    def widen(word):
        return tirx.Cast("int64", word) if index == "int64" else word

    def product(A, B, i, k):
        a, b = (A[i], B[k]) if rows else (A[0], B[i, k])
        return lane_of(widen(a), k, a_dtype) * T.cast(b, "int32")

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer(a_shape, "int32", offset_factor=1),
        B: T.Buffer(b_shape, b_dtype, offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], _whole(A), _whole(B))
            T.writes(C[0:lanes])
            for i, k in T.grid(T.cast(lanes, index), T.cast(depth, index)):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + product(A, B, vi, vk)

    return desc


def _operands(A, B, lanes: int, depth: int, dtype: str, rows: bool):
    """The activation and the weight as one instruction's operand vectors of ``lanes * depth``
    ``dtype`` elements: one of them a broadcast word. Passed inline, not bound to names: a named
    vector becomes a stack slot that LLVM does not always promote back to a register."""
    vec = f"{dtype}x{lanes * depth}"

    def as_vec(v):
        return v if str(v.ty) == vec else T.reinterpret(v, dtype=vec)

    if rows:
        word = B[0] if depth == 1 else T.reinterpret(B.vload([0], f"{B.dtype}x{depth}"), dtype="int32")
        return as_vec(A.vload([0], f"{A.dtype}x{lanes}")), as_vec(T.broadcast(word, lanes))
    return as_vec(T.broadcast(A[0], lanes)), as_vec(B.vload([0, 0], f"{B.dtype}x{lanes * depth}"))


def _impl_fma(lanes: int, dtype: str, rows: bool):
    vec = f"{dtype}x{lanes}"  # float64 x 16 lanes: LLVM splits it into two (zmm) or four (ymm) FMAs
    a_shape, b_shape = _shapes(lanes, 1, rows)

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer(a_shape, dtype, offset_factor=1),
        B: T.Buffer(b_shape, dtype, offset_factor=1),
        C: T.Buffer((lanes,), dtype, offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], _whole(A), _whole(B))
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.fma"),
                *_operands(A, B, lanes, 1, dtype, rows),
                C.vload([0], vec),
                dtype=vec,
            )

    return impl


def _desc_fma(lanes: int, dtype: str, rows: bool):
    a_shape, b_shape = _shapes(lanes, 1, rows)

    def product(A, B, i):
        return A[i] * B[0] if rows else A[0] * B[i, 0]

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer(a_shape, dtype, offset_factor=1),
        B: T.Buffer(b_shape, dtype, offset_factor=1),
        C: T.Buffer((lanes,), dtype, offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], _whole(A), _whole(B))
            T.writes(C[0:lanes])
            for i, _k in T.grid(lanes, 1):  # TVM drops a unit reduction axis from the kernel's block
                with T.sblock("update"):
                    vi = T.axis.spatial(lanes, i)
                    C[vi] = C[vi] + product(A, B, vi)

    return desc


def _impl_bytes(lanes: int, llvm_names: tuple[str, str], rows: bool, int16_sums: bool = False):
    """u8 x s8 on ``vpmaddubsw`` (pairs into int16), then ``vpmaddwd`` by ones (into int32) and an
    add, or with ``int16_sums`` an int16 add (``vpaddw``) into C's two halves per lane."""
    pairs_vec, acc_vec = f"int16x{lanes * 2}", f"int32x{lanes}"
    ubsw, wd = llvm_names
    a_shape, b_shape = _shapes(lanes, 4, rows)

    def accumulate(A, B, C):
        pairs = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(ubsw), *_operands(A, B, lanes, 4, "int8", rows), dtype=pairs_vec
        )
        acc = C.vload([0], acc_vec)
        if int16_sums:
            return T.reinterpret(T.reinterpret(acc, dtype=pairs_vec) + pairs, dtype=acc_vec)
        ones = T.broadcast(T.int16(1), lanes * 2)
        return acc + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(wd), pairs, ones, dtype=acc_vec)

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer(a_shape, "int32", offset_factor=1),
        B: T.Buffer(b_shape, "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], _whole(A), _whole(B))
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = accumulate(A, B, C)

    return impl


def _desc_pairs(lanes: int, index: str, rows: bool):
    """The int16-sum form of the byte chain (``te_dot``'s ``int16_sums``): each int32 lane of C two
    int16 sums, of the word's first and second pair of products, added half by half."""
    a_shape, b_shape = _shapes(lanes, 4, rows)

    def terms(A, B, i):
        a = A[i] if rows else A[0]

        def product(k: int):  # the shifts are constants here: the word stays int32 (cf. ``_desc``)
            b = B[k] if rows else B[i, k]
            return lane_of(a, k, "uint8") * T.cast(b, "int32")

        return int16_pair_word(product(0) + product(1), product(2) + product(3))

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer(a_shape, "int32", offset_factor=1),
        B: T.Buffer(b_shape, "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], _whole(A), _whole(B))
            T.writes(C[0:lanes])
            for i, _k in T.grid(T.cast(lanes, index), T.cast(1, index)):
                with T.sblock("update"):
                    vi = T.axis.spatial(lanes, i)
                    C[vi] = int16_lanes_add(C[vi], terms(A, B, vi))

    return desc


def _impl(lanes: int, depth: int, b_dtype: str, llvm_name: str, fused: bool, rows: bool):
    """``fused``: the instruction adds into C itself (VNNI); otherwise a separate vector add."""
    acc_vec = f"int32x{lanes}"
    op_dtype = f"int{32 // depth}"  # LLVM 22 types the operands as i8/i16 vectors
    a_shape, b_shape = _shapes(lanes, depth, rows)

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer(a_shape, "int32", offset_factor=1),
        B: T.Buffer(b_shape, b_dtype, offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], _whole(A), _whole(B))
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                C.vload([0], acc_vec),
                *_operands(A, B, lanes, depth, op_dtype, rows),
                dtype=acc_vec,
            )

    @T.prim_func(s_tir=True)
    def impl_add(
        A: T.Buffer(a_shape, "int32", offset_factor=1),
        B: T.Buffer(b_shape, b_dtype, offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], _whole(A), _whole(B))
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], acc_vec) + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_name),
                *_operands(A, B, lanes, depth, op_dtype, rows),
                dtype=acc_vec,
            )

    return impl if fused else impl_add


BYTES = {  # u8 x s8 without VNNI: (vpmaddubsw, vpmaddwd)
    "marvin_dot_avx512_4": (16, ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512")),
    "marvin_dot_avx2_4": (8, ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd")),
}
_TABLE = {  # name: (lanes, depth, operand dtypes, LLVM intrinsic, adds into C itself)
    "marvin_dot_avx512_vnni_4": (16, 4, "uint8", "int8", "llvm.x86.avx512.vpdpbusd.512", True),
    "marvin_dot_avx512_vnni_2": (16, 2, "int16", "int16", "llvm.x86.avx512.vpdpwssd.512", True),
    "marvin_dot_avx512_2": (16, 2, "int16", "int16", "llvm.x86.avx512.pmaddw.d.512", False),
    "marvin_dot_avx2_2": (8, 2, "int16", "int16", "llvm.x86.avx2.pmadd.wd", False),
    "marvin_dot_avx512_vnni_1": (16, 1, "float32", "float32", "llvm.fma", True),
    "marvin_dot_avx512_1": (16, 1, "float32", "float32", "llvm.fma", True),
    "marvin_dot_avx2_1": (8, 1, "float32", "float32", "llvm.fma", True),
    "marvin_dot_avx512_vnni_f64": (16, 1, "float64", "float64", "llvm.fma", True),
    "marvin_dot_avx512_f64": (16, 1, "float64", "float64", "llvm.fma", True),
    "marvin_dot_avx2_f64": (8, 1, "float64", "float64", "llvm.fma", True),
}


ROWS = "_rows"  # the pixel-lane form's suffix
PAIRS = "_s16"  # the byte chain's int16-sum form's suffix (after the depth)


@functools.cache
def _register(name: str) -> None:
    """``name``: a ``_TABLE`` or ``BYTES`` key (a ``BYTES`` one possibly followed by ``PAIRS``), for
    an integer one followed by ``_int32`` or ``_int64``, then ``ROWS`` for the pixel-lane form."""
    rows = name.endswith(ROWS)
    key = name.removesuffix(ROWS)
    key, _, index = key.rpartition("_") if key.endswith(("_int32", "_int64")) else (key, "", "")
    with fast_parsing():
        if key.endswith(PAIRS):
            lanes, llvm_names = BYTES[key.removesuffix(PAIRS)]
            desc, impl = (
                _desc_pairs(lanes, index, rows),
                _impl_bytes(lanes, llvm_names, rows, int16_sums=True),
            )
        elif key in BYTES:
            lanes, llvm_names = BYTES[key]
            desc, impl = _desc(lanes, 4, "uint8", "int8", index, rows), _impl_bytes(lanes, llvm_names, rows)
        else:
            lanes, depth, a_dtype, b_dtype, llvm_name, fused = _TABLE[key]
            if depth == 1:
                desc, impl = _desc_fma(lanes, a_dtype, rows), _impl_fma(lanes, a_dtype, rows)
            else:
                desc = _desc(lanes, depth, a_dtype, b_dtype, index, rows)
                impl = _impl(lanes, depth, b_dtype, llvm_name, fused, rows)
    TensorIntrin.register(name, desc, impl, override=True)
