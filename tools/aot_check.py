"""Compile every Triton kernel of d2v for Hopper (sm_90) and Ampere (sm_80) without a GPU, and check what
the compiled code says about speed: register spills and the width of every global load and store.

Why: the kernels' speed on a GPU depends on facts the compiler fixes long before a launch (a spilling
kernel round-trips registers through local memory; a 4-byte load moves a quarter of what a 16-byte one
does per instruction), and a developer without a GPU can read them from the compiler's own output.

How: Triton's active driver is replaced by a stub that reports a CUDA target of the chosen compute
capability, and `JITFunction.run` is forced to `warmup=True` (compile, never launch). The project's public
launchers (`gather_triton`, `scatter_triton`, `gather_backward_triton`, `scatter_fill_grad_triton`,
`build_targets_triton`, `ema_update_triton_`) are then called with CPU tensors of the recipes' real shapes,
strides and dtypes. Triton's own binder therefore specializes the arguments (dtypes, 16-divisibility of
ints, pointer alignment) exactly as a launch on a GPU would, and the launchers choose grids, tiles and
`num_warps` themselves: a change to a launcher is picked up without touching this file. Every kernel that
gets compiled is recorded, whatever its name.

Per compiled kernel it records grid, num_warps, registers and spill bytes (ptxas -v), shared memory
(Triton's metadata), and the static count of `ld.global` / `st.global` (and `cp.async`) instructions in
the PTX by width in bytes, each classified as an *index* access (an id table, the inverse map, the EMA's
chunk/address tables) or a *data* access. The classification follows each address back through the PTX
to the kernel parameter it is computed from: addresses from a pointer to integers are index accesses,
addresses from a pointer to floats, or from an address that was itself loaded from memory (the EMA's
tensor addresses), are data. RULES below can name further index arguments per kernel; a kernel that no
rule names is held to the strictest default.

Checks (RULES, TAILS): no kernel spills; every data access of the gather, scatter, target and EMA
kernels (and of any kernel not named in RULES) is at least 16 bytes wide (v4.b32, v2.b64, v8.b16 ...),
unless TAILS accepts a given number of narrower ones with a reason; shared memory fits the architecture.

What it cannot tell (nothing runs): timings, achieved bandwidth, occupancy under real scheduling,
numerical results, launch-time errors, and how often each instruction executes (the counts are static:
an access inside a loop counts once).

Usage (from the repository root, with TRITON_INTERPRET unset):
    .venv/bin/python tools/aot_check.py                    # all cases, sm_90 and sm_80
    .venv/bin/python tools/aot_check.py --quick --arch 90  # a few cases
    .venv/bin/python tools/aot_check.py --out aot.md       # also writes aot.md and aot.csv
    .venv/bin/python tools/aot_check.py --list             # the case names
    .venv/bin/python tools/aot_check.py --cases 'vit-b/targets/*' --dump /tmp/ptx   # keep PTX/TTIR
    git archive HEAD d2v kernels configs | tar -x -C /tmp/head && \
        .venv/bin/python tools/aot_check.py --source /tmp/head         # the committed kernels instead
The kernels compiled are the ones in the checkout holding this file (or --source), not a copy the venv
may have installed. One worker process per arch, both at once: all cases take about 3 minutes on 2
cores, --quick about 1; --cache-dir DIR keeps the compiled kernels for faster reruns.
Exit status: 0 all checks pass, 1 a check failed (or a kernel did not compile), 2 the harness failed.
Works with Triton 3.6-3.8 (it uses only JITFunction.run, the driver's set_active and GPUTarget).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fnmatch
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout holding this tool
ARCHS = (90, 80)
# largest dynamic shared memory one block may opt in to: H100/H200 227 KiB, A100 163 KiB
SMEM_LIMIT = {90: 232448, 80: 166912}
VECTOR_BYTES = 16  # one 128-bit access per thread: the widest plain global load/store on sm_80/sm_90


# ------------------------------------------------------------------------------------ rules


@dataclass(frozen=True)
class Rule:
    """What a kernel (fnmatch pattern on the compiled kernel's name) is held to. The first match wins."""

    kernel: str
    family: str
    data_bytes: int | None = VECTOR_BYTES  # narrowest data access allowed; None: widths not checked
    spill_bytes: int = 0  # spill stores + spill loads per thread allowed
    index_args: tuple[str, ...] = ()  # arguments read as index tables whatever their pointer type
    aux_args: tuple[str, ...] = ()  # small side tables (e.g. per-column statistics): reported as "aux",
    #                                 widths not checked; name them only with a reason in `why`
    why: str = ""


RULES: tuple[Rule, ...] = (
    Rule("gather_kernel", "gather", index_args=("ids_ptr",),
         why="ids (int64/int32) are index loads; the rows it copies are data"),
    Rule("invert_kernel", "gather", index_args=("ids_ptr", "inv_ptr"),
         why="builds the int32 inverse map: index accesses only"),
    Rule("scatter_kernel", "scatter", index_args=("inv_ptr",),
         why="the int32 inverse map is an index load; src, fill and out rows are data"),
    Rule("*targets*", "targets", why="layer strips in, fp32 targets out"),
    Rule("stats_kernel", "targets", aux_args=("part_ptr",),
         why="split-T pass 1: layer tiles in (data); per-(chunk, channel) sums out, 1/16 of the input bytes "
             "(bf16) and written as a reduction's (BLOCK_D,) vector, so 4-byte stores (aux)"),
    Rule("combine_kernel", "targets", aux_args=("part_ptr", "stat_ptr"),
         why="split-T merge of the per-chunk sums into mean and 1/std per channel: statistics only (aux)"),
    Rule("apply_kernel", "targets", aux_args=("part_ptr", "stat_ptr"),
         why="split-T pass 2: layer tiles in and fp32 targets out (data); per-channel statistics in and "
             "the average's per-chunk sums out (aux)"),
    Rule("normalize_kernel", "targets", aux_args=("stat_ptr",),
         why="split-T final instance norm in place (data); per-channel statistics in (aux)"),
    Rule("layer_norm_rows*", "targets", why="final_norm=layer pass over the fp32 targets"),
    Rule("*ema*", "ema",
         index_args=("chunks_ptr", "ema_addr_ptr", "par_addr_ptr", "low_addr_ptr", "end_ptr"),
         why="chunk/address/numel tables are index loads; ema, param and low-precision copies are data"),
    Rule("*", "other", why="a kernel no rule names: every load and store from a float pointer is data"),
)


@dataclass(frozen=True)
class Tail:
    """Accepted narrow data accesses: up to `count` instructions of `op` ("ld"/"st") narrower than the
    rule's width in kernels/cases/archs matching the patterns, for the stated reason (e.g. a masked
    scalar tail after a vectorized main loop)."""

    kernel: str
    count: int
    why: str
    case: str = "*"
    arch: str = "*"
    op: str = "*"


TAILS: tuple[Tail, ...] = (
    Tail("ema_kernel", 48, case="*/ema-tails/*",
         why="the EMA's second launch (ALIGNED=False) covers only each tensor's last numel % 16 elements and "
             "tensors whose address is not 16-byte aligned: masked scalar accesses, a few elements per "
             "tensor; the bulk goes through the aligned launch, checked by the plain ema cases"),
)


def rule_for(kernel: str) -> Rule:
    for r in RULES:
        if fnmatch.fnmatchcase(kernel, r.kernel):
            return r
    return RULES[-1]


# ------------------------------------------------------------------------------------ cases
# Shapes of the recipes (configs/*.yaml): B samples, M clones (R = B*M rows), T tokens after the extra
# (CLS) tokens E are stripped, K kept tokens per row (N = T - K masked), D width, L target layers.


@dataclass(frozen=True)
class Shape:
    B: int
    M: int
    T: int
    E: int
    K: int
    D: int
    L: int
    final: str


SHAPES = {
    "vit-b": Shape(B=16, M=16, T=196, E=1, K=39, D=768, L=10, final="layer"),  # base_image: keep 20%
    "vit-l": Shape(B=8, M=16, T=196, E=1, K=49, D=1024, L=18, final="layer"),  # large_image: keep 25%
    "audio-b": Shape(B=8, M=8, T=999, E=0, K=500, D=768, L=8, final="none"),  # base_audio: ~20 s crops
    "text-b": Shape(B=4, M=8, T=512, E=0, K=267, D=768, L=12, final="none"),  # base_text: mask 48%
    "t4096": Shape(B=2, M=4, T=4096, E=0, K=2048, D=768, L=12, final="none"),  # longest T the kernels take
}


@dataclass(frozen=True)
class Case:
    """One launcher call. dt: the main tensor's dtype; dt2: the second one (scatter fill, fill-grad
    output, EMA low-precision copy); final: targets' final_norm; ids: index dtype."""

    model: str
    op: str
    dt: str = "bf16"
    dt2: str | None = None
    final: str | None = None
    ids: str = "i64"
    quick: bool = False

    @property
    def name(self) -> str:
        if self.op == "dec-scatter":
            what = f"src={self.dt}" + ("(view)" if SHAPES[self.model].E else "") + f",fill={self.dt2}"
        elif self.op == "fill-grad":
            what = f"g={self.dt},fill={self.dt2}"
        elif self.op in ("ema", "ema-tails"):
            what = f"param={self.dt}" + (f",out={self.dt2}" if self.dt2 else "")
        else:
            what = self.dt
        if self.op == "targets":
            what += f",final={self.final}"
        if self.ids != "i64":
            what += f",ids={self.ids}"
        return f"{self.model}/{self.op}/{what}"


def _cases() -> list[Case]:
    """The launcher calls the model makes (d2v/model.py, d2v/modalities), at each recipe's shapes."""
    c: list[Case] = []
    # ViT-B: every op and dtype mix
    for dt in ("fp32", "bf16", "fp16"):
        c.append(Case("vit-b", "keep-gather", dt, quick=dt == "bf16"))  # student input, clones repeated
    c.append(Case("vit-b", "keep-gather", "bf16", ids="i32"))
    for src, fill in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"), ("fp16", "fp16")):
        c.append(Case("vit-b", "dec-scatter", src, fill, quick=(src, fill) == ("fp32", "bf16")))
    for dt in ("bf16", "fp32", "fp16"):
        c.append(Case("vit-b", "pred-gather", dt))  # decoder output at the masked tokens
    c.append(Case("vit-b", "clone-targets", "fp32"))  # fp32 targets per clone, clones=M
    for dt in ("bf16", "fp32"):
        c.append(Case("vit-b", "gather-bwd", dt))
    for g, fill in (("bf16", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")):
        c.append(Case("vit-b", "fill-grad", g, fill))
    for dt in ("fp32", "bf16", "fp16"):
        for final in ("none", "layer", "instance"):
            c.append(Case("vit-b", "targets", dt, final=final, quick=(dt, final) == ("bf16", "layer")))
    # the other recipes: the ops whose tiles depend on T and D
    for model in ("vit-l", "audio-b", "text-b", "t4096"):
        s = SHAPES[model]
        c.append(Case(model, "keep-gather", "bf16"))
        c.append(Case(model, "dec-scatter", "fp32", "bf16"))
        c.append(Case(model, "clone-targets", "fp32"))
        for dt in ("bf16", "fp32"):
            c.append(Case(model, "targets", dt, final=s.final, quick=(model, dt) == ("t4096", "bf16")))
    c.append(Case("t4096", "targets", "bf16", final="instance"))
    # EMA over the ViT-B teacher's parameter list
    for par, low in (("fp32", None), ("bf16", None), ("fp32", "bf16"), ("bf16", "bf16"), ("fp16", "fp16")):
        c.append(Case("vit-b", "ema", par, low, quick=(par, low) in (("fp32", None), ("bf16", "bf16"))))
    c.append(Case("vit-b", "ema-tails", "bf16", "bf16"))  # + tensors of 17 and 1 elements: the tail launch
    return c


CASES = _cases()


def select_cases(patterns: list[str] | None, quick: bool) -> list[Case]:
    out = [c for c in CASES if (c.quick or not quick)]
    if patterns:
        out = [c for c in out if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    return out


# ------------------------------------------------------------------------------------ PTX analysis

_REG = re.compile(r"%[a-zA-Z]+\d+")
_PARAM = re.compile(r"\[\s*\w+_param_(\d+)\s*(?:\+\s*\d+\s*)?\]")
_ENTRY_PARAM = re.compile(r"\.param\s+(\.\w+)\s*(\.ptr)?[^,)]*?\b\w+_param_(\d+)")
_GLOBAL_SPACES = ("global",)
_OTHER_SPACES = ("param", "shared", "local", "const", "tex")


@dataclass
class Access:
    """One global memory instruction of the PTX (static: an access in a loop counts once)."""

    op: str  # "ld" | "st" (cp.async counts as ld)
    form: str  # e.g. "v4.b32", "b64", "cp16"
    bytes: int
    params: tuple[int, ...]  # pointer parameters its address is computed from (empty: a loaded address)
    via: tuple[int, ...] = ()  # pointer parameters of the tables its address (or an index in it) came from


def _split_operands(s: str) -> list[str]:
    out, cur, depth = [], [], 0
    for ch in s:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if cur and "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _statements(ptx: str):
    """(opcode, operand list) per instruction, predicates, labels, directives and comments dropped."""
    for raw in ptx.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line or line[0] in ".{}$" or line.endswith(":"):
            continue
        line = re.sub(r"^@!?%\w+\s+", "", line).rstrip(";").strip()
        m = re.match(r"([a-z][\w.:]*)\s*(.*)$", line)
        if m:
            yield m.group(1), _split_operands(m.group(2))


def _width(opcode: str, operands: list[str]) -> tuple[str, int]:
    mods = opcode.split(".")[1:]
    if opcode.startswith("cp.async"):
        size = operands[2] if len(operands) > 2 else "0"
        n = int(size, 0) if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", size) else 0
        return f"cp{n}", n
    vec = 1
    bits = 0
    for m in mods:
        if re.fullmatch(r"v\d+", m):
            vec = int(m[1:])
        elif re.fullmatch(r"[bsuf]\d+", m):
            bits = int(m[1:])
    ty = next((m for m in reversed(mods) if re.fullmatch(r"[bsuf]\d+", m)), "?")
    form = (f"v{vec}." if vec > 1 else "") + ty
    return form, vec * bits // 8


def _global_kind(opcode: str) -> str | None:
    """"ld" / "st" for a global-memory access (explicit .global, or generic addressing), else None."""
    parts = opcode.split(".")
    if parts[:2] == ["cp", "async"]:  # global -> shared copy (not the bulk/TMA forms)
        return "ld" if "global" in parts and "bulk" not in parts else None
    if parts[0] not in ("ld", "st"):
        return None
    space = parts[1] if len(parts) > 1 else ""
    if space in _GLOBAL_SPACES:
        return parts[0]
    if space in _OTHER_SPACES:
        return None
    return parts[0]  # generic address: may be global


def analyze_ptx(ptx: str) -> tuple[list[Access], dict[int, bool]]:
    """The global accesses of one kernel's PTX, each with the parameters its address derives from.

    Register origins are propagated flow-insensitively to a fixed point (a register's origins are the
    union over every instruction that writes it): `ld.param` seeds a register with its parameter, any
    other instruction passes the union of its source operands' origins to its destinations, values
    stored to shared/local memory come back out of loads from there, and a load from global memory
    passes "loaded from" marks instead (a loaded id or address is not the pointer it came from:
    gather's row address is x_ptr's, not ids_ptr's). Returns the accesses and, per parameter
    index, whether PTX declares it a pointer."""
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, flags=re.S)
    is_ptr = {}
    if entry:
        for m in _ENTRY_PARAM.finditer(entry.group(1)):
            is_ptr[int(m.group(3))] = bool(m.group(2))
    stmts = list(_statements(ptx))
    # origins: int p = computed from parameter p; -1 - p = loaded from an address computed from p
    origin: dict[str, set[int]] = {}

    def regs_origin(operand: str) -> set[int]:
        out: set[int] = set()
        for r in _REG.findall(operand):
            out |= origin.get(r, set())
        return out

    pools: dict[str, set[int]] = {"shared": set(), "local": set()}  # what was stored there, any address
    changed = True
    while changed:
        changed = False
        for opcode, ops in stmts:
            if not ops:
                continue
            parts = opcode.split(".")
            head, space = parts[0], (parts[1].split("::")[0] if len(parts) > 1 else "")
            if opcode.startswith("ld.param"):
                pm = _PARAM.search(ops[1]) if len(ops) > 1 else None
                src = {int(pm.group(1))} if pm else set()
            elif head == "st" and space in pools:
                # a layout conversion can move pointers through shared memory: whatever is stored comes
                # back out of any later shared load (flow- and address-insensitive, so conservative)
                val: set[int] = set()
                for o in ops[1:]:
                    val |= regs_origin(o)
                if not val <= pools[space]:
                    pools[space] |= val
                    changed = True
                continue
            elif head == "ld" and space in pools:
                src = set(pools[space])
            elif head == "ld" and len(ops) > 1:
                src = {-1 - p for p in regs_origin(ops[1]) if p >= 0}
            elif head in ("ld", "st", "atom", "red", "cp", "bar", "bra", "ret", "call", "membar", "fence"):
                continue
            else:
                src = set()
                for o in ops[1:]:
                    src |= regs_origin(o)
            if not src:
                continue
            for r in _REG.findall(ops[0]):
                cur = origin.setdefault(r, set())
                if not src <= cur:
                    cur |= src
                    changed = True
    out = []
    for opcode, ops in stmts:
        kind = _global_kind(opcode)
        if kind is None or len(ops) < (2 if kind == "ld" else 1):
            continue
        o = regs_origin(ops[1] if kind == "ld" else ops[0])
        direct = tuple(sorted(p for p in o if p >= 0 and is_ptr.get(p, True)))
        via = tuple(sorted(-1 - p for p in o if p < 0 and is_ptr.get(-1 - p, True)))
        form, nbytes = _width(opcode, ops)
        out.append(Access(kind, form, nbytes, direct, via))
    return out, is_ptr


def ttir_args(ttir: str, name: str) -> list[tuple[str, str]]:
    """(name, MLIR type) of each argument of the public kernel function in TTIR, in order."""
    m = re.search(r"tt\.func\s+public\s+@" + re.escape(name) + r"\s*\(", ttir)
    if not m:
        return []
    i, depth, start = m.end(), 1, m.end()
    while i < len(ttir) and depth:
        depth += {"(": 1, ")": -1}.get(ttir[i], 0)
        i += 1
    args = []
    for a in _split_operands(ttir[start:i - 1]):
        am = re.match(r"%([\w.]+)\s*:\s*([^\s{]+)", a)
        if am:
            args.append((am.group(1), am.group(2)))
    return args


def signature_args(signature: dict) -> list[tuple[str, str]]:
    """(name, Triton type) of the runtime arguments, tuples flattened as name.i, constexprs dropped:
    the order Triton gives the kernel's parameters."""
    out = []

    def walk(name, ty):
        if isinstance(ty, (tuple, list)):
            for j, t in enumerate(ty):
                walk(f"{name}.{j}", t)
        elif ty != "constexpr":
            out.append((name, str(ty)))

    for k, v in signature.items():
        walk(k, v)
    return out


def pointee(ty: str) -> str | None:
    """Element type of a pointer argument ('!tt.ptr<bf16>' or '*bf16'), None for a scalar."""
    m = re.fullmatch(r"!tt\.ptr<([^>]+)>", ty)
    if m:
        return m.group(1)
    if ty.startswith("*"):
        return ty[1:].lstrip("k")  # '*k...' marks a constant pointer in some Triton versions
    return None


def _is_int(elem: str | None) -> bool:
    return bool(elem) and re.fullmatch(r"[iu]\d+", elem) is not None


def classify(acc: Access, args: list[tuple[str, str]], rule: Rule) -> tuple[str, str]:
    """("index" | "aux" | "data", which arguments the address comes from). Index: every pointer argument
    the address derives from points to integers or is listed in the rule's index_args. Aux: every one
    is in the rule's aux_args. Data otherwise, including addresses loaded from memory and arguments
    whose type is unknown."""
    if not acc.params:  # an address read from a table (the EMA's tensor addresses): data, named by its table
        names = [args[p][0] if p < len(args) else f"param_{p}" for p in acc.via]
        return "data", "*(" + "+".join(_compress_names(names)) + ")" if names else "(loaded address)"
    names, kinds = [], []
    for p in acc.params:
        if p < len(args):
            name, ty = args[p]
            base = name.split(".")[0]
            if _is_int(pointee(ty)) or name in rule.index_args or base in rule.index_args:
                kinds.append("index")
            elif name in rule.aux_args or base in rule.aux_args:
                kinds.append("aux")
            else:
                kinds.append("data")
        else:
            name = f"param_{p}"  # a parameter Triton appends (scratch): unknown, so data
            kinds.append("data")
        names.append(name)
    kind = "data" if "data" in kinds else ("aux" if "aux" in kinds else "index")
    return kind, "+".join(_compress_names(names))


def _compress_names(names: list[str]) -> list[str]:
    """layers.0 .. layers.9 -> layers.0-9, to keep table cells short."""
    groups: dict[str, list[int]] = {}
    out = []
    for n in names:
        m = re.fullmatch(r"(.+)\.(\d+)", n)
        if m:
            if m.group(1) not in groups:
                groups[m.group(1)] = []
                out.append(m.group(1))
            groups[m.group(1)].append(int(m.group(2)))
        else:
            out.append(n)
    return [f"{n}.{min(groups[n])}-{max(groups[n])}" if n in groups and len(groups[n]) > 1
            else (f"{n}.{groups[n][0]}" if n in groups else n) for n in out]


# ------------------------------------------------------------------------------------ ptxas log

_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")


def parse_ptxas_log(log: str) -> dict[str, dict]:
    """ptxas -v output -> {kernel name: {regs, spill_st, spill_ld, stack}} (the last block per name)."""
    out: dict[str, dict] = {}
    blocks = _PTXAS_ENTRY.split(log)
    # split gives [before, name, arch, text, name, arch, text, ...]
    for j in range(1, len(blocks) - 2, 3):
        name, text = blocks[j], blocks[j + 2]
        info = {"regs": None, "spill_st": 0, "spill_ld": 0, "stack": 0}
        m = re.search(r"Used (\d+) registers", text)
        if m:
            info["regs"] = int(m.group(1))
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
        if m:
            info["stack"], info["spill_st"], info["spill_ld"] = (int(g) for g in m.groups())
        out[name] = info
    return out


# ------------------------------------------------------------------------------------ checks


@dataclass
class Row:
    arch: int
    case: str
    kernel: str
    grid: str = ""
    num_warps: int | None = None
    num_stages: int | None = None
    regs: int | None = None
    spill_st: int | None = None
    spill_ld: int | None = None
    stack: int | None = None
    smem: int | None = None
    hash: str = ""
    accesses: list[dict] = field(default_factory=list)  # {op, kind, bytes, form, args, count}
    error: str = ""  # a compile failure of this kernel


def summarize_accesses(accesses: list[Access], args: list[tuple[str, str]], rule: Rule) -> list[dict]:
    cnt: Counter = Counter()
    for a in accesses:
        kind, src = classify(a, args, rule)
        cnt[(a.op, kind, a.bytes, a.form, src)] += 1
    order = sorted(cnt.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2]))
    return [{"op": op, "kind": kind, "bytes": b, "form": form, "args": src, "count": n}
            for (op, kind, b, form, src), n in order]


def _tail_matches(t: Tail, row: Row, op: str) -> bool:
    pairs = ((row.kernel, t.kernel), (row.case, t.case), (str(row.arch), t.arch), (op, t.op))
    return all(fnmatch.fnmatchcase(v, pat) for v, pat in pairs)


def check_row(row: Row) -> list[str]:
    """The violations of one compiled kernel, each a sentence naming what was found."""
    if row.error:
        return [f"did not compile: {row.error}"]
    rule = rule_for(row.kernel)
    out = []
    spills = (row.spill_st or 0) + (row.spill_ld or 0)
    if row.regs is None:
        out.append("no ptxas register report")
    elif spills > rule.spill_bytes:
        out.append(f"spills {row.spill_st} B stores / {row.spill_ld} B loads per thread "
                   f"({row.regs} registers; allowed {rule.spill_bytes})")
    limit = SMEM_LIMIT.get(row.arch)
    if limit is not None and row.smem is not None and row.smem > limit:
        out.append(f"needs {row.smem} B shared memory, sm_{row.arch} allows {limit}")
    if rule.data_bytes is not None:
        for op in ("ld", "st"):
            narrow = [a for a in row.accesses
                      if a["op"] == op and a["kind"] == "data" and a["bytes"] < rule.data_bytes]
            n = sum(a["count"] for a in narrow)
            if not n:
                continue
            allowed = sum(t.count for t in TAILS if _tail_matches(t, row, op))
            if n > allowed:
                groups: dict[tuple, list] = {}  # one entry per instruction form: "192 x ... from layers.0-11"
                for a in narrow:
                    g = groups.setdefault((a["form"], a["bytes"]), [0, []])
                    g[0] += a["count"]
                    g[1] += [x for x in re.findall(r"\*\([^)]*\)|[^+]+", a["args"]) if x not in g[1]]
                what = ", ".join(f"{cnt} x {op}.global.{form} ({b} B) from {'+'.join(_compress_names(names))}"
                                 for (form, b), (cnt, names) in groups.items())
                out.append(f"{n} data {'loads' if op == 'ld' else 'stores'} narrower than {rule.data_bytes} B"
                           + (f" ({allowed} accepted as tails)" if allowed else "") + f": {what}")
    return out


# ------------------------------------------------------------------------------------ worker (one arch)


class HarnessError(RuntimeError):
    pass


class _CompileFailed(RuntimeError):
    def __init__(self, kernel: str, err: BaseException):
        first = (str(err).strip().splitlines() or [""])[0]
        super().__init__(f"{kernel}: {type(err).__name__}: {first}")
        self.kernel = kernel


def interpreting() -> bool:
    """Same truth test as d2v.kernels._triton.interpreting: Triton's CPU interpreter is on."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


class _StubDriver:
    """Triton driver that names a CUDA target and can neither load nor launch: enough for Triton to
    bind arguments and compile. Anything else Triton asks of it raises, naming what was asked."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls):
        return False

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_capability(self, device=None):
        return divmod(self.target.arch, 10)

    def __getattr__(self, name):
        raise HarnessError(f"the stub Triton driver has no {name!r}: this Triton version asks the driver "
                           f"for more than compiling needs (or a kernel was about to launch)")


def _ptxas_path(arch: int) -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:
        pass
    try:
        from triton.backends.nvidia.compiler import _path_to_binary

        return _path_to_binary("ptxas")[0]
    except Exception:
        pass
    import triton

    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return p if os.path.exists(p) else shutil.which("ptxas")


def _ptxas_rerun(ptx: str, arch: int) -> str:
    """ptxas -v on the PTX (when Triton did not print its own log): same arch, Triton's usual flags."""
    path = _ptxas_path(arch)
    if not path:
        raise HarnessError("ptxas not found (neither Triton's bundled one nor on PATH)")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [path, "-lineinfo", "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise HarnessError(f"ptxas failed: {res.stderr[-2000:]}")
    return res.stderr + res.stdout


class _Recorder:
    """Forces every JITFunction.run to compile only, and records each compiled kernel."""

    def __init__(self, arch: int, dump: str | None, side_cache: str | None):
        self.arch, self.dump, self.case = arch, dump, ""
        self.rows: list[Row] = []
        self.by_hash: dict[str, dict] = {}  # analysis per compiled binary (in-process cache hits)
        self.side_cache = side_cache
        self.ptxas = {}
        if side_cache and os.path.exists(side_cache):
            with open(side_cache) as f:
                self.ptxas = json.load(f)

    def install(self):
        from triton.runtime.jit import JITFunction

        orig = JITFunction.run
        rec = self

        def run(fn, *args, **kwargs):
            grid = kwargs.get("grid")
            kwargs["warmup"] = True
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    kernel = orig(fn, *args, **kwargs)
            except HarnessError:
                raise
            except Exception as e:
                raise _CompileFailed(getattr(fn, "__name__", str(fn)), e) from e
            if kernel is None:
                raise HarnessError(f"{fn}: Triton returned no compiled kernel (a jit hook or async compile?)")
            rec.add(kernel, grid, buf.getvalue())
            return kernel

        JITFunction.run = run

    def add(self, kernel, grid, log: str):
        md = kernel.metadata
        name = getattr(md, "name", None) or kernel.name
        h = str(getattr(md, "hash", "") or getattr(kernel, "hash", ""))
        info = self.by_hash.get(h)
        if info is None:
            info = self._analyze(kernel, name, h, log)
            self.by_hash[h] = info
        if callable(grid):
            grid_s = "callable"
        else:
            grid_s = "x".join(str(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,)))
        self.rows.append(Row(arch=self.arch, case=self.case, kernel=name, grid=grid_s,
                             num_warps=getattr(md, "num_warps", None),
                             num_stages=getattr(md, "num_stages", None),
                             smem=getattr(md, "shared", None), hash=h[:12], **info))

    def _analyze(self, kernel, name: str, h: str, log: str) -> dict:
        ptx = kernel.asm["ptx"]
        ttir = kernel.asm.get("ttir", "")
        ptxas = parse_ptxas_log(log).get(name) or self.ptxas.get(h)
        if ptxas is None:
            ptxas = parse_ptxas_log(_ptxas_rerun(ptx, self.arch)).get(name)
        if ptxas is None:
            raise HarnessError(f"{name}: no ptxas report for this kernel")
        self.ptxas[h] = ptxas
        # argument names and types, in parameter order: names from the Python signature (tuples
        # flattened), types from the TTIR, which is what the kernel was compiled with
        tt = ttir_args(ttir, name)
        sig = []
        with contextlib.suppress(Exception):
            sig = signature_args(dict(kernel.src.signature))
        if tt and len(sig) == len(tt):
            args = [(s[0], t[1]) for s, t in zip(sig, tt)]
        else:
            args = tt or sig
        accesses, _ = analyze_ptx(ptx)
        if self.dump:
            slug = re.sub(r"[^\w.=,-]+", "_", self.case)
            stem = os.path.join(self.dump, f"sm{self.arch}", f"{slug}.{name}")
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            for ext in ("ptx", "ttir", "ttgir"):
                if ext in kernel.asm:
                    with open(f"{stem}.{ext}", "w") as f:
                        f.write(kernel.asm[ext])
        return {**ptxas, "accesses": summarize_accesses(accesses, args, rule_for(name))}

    def save(self):
        if self.side_cache:
            with open(self.side_cache, "w") as f:
                json.dump(self.ptxas, f)


def import_source(root: str):
    """Import `d2v` and `d2v.kernels` from the checkout `root` (whatever the venv installed: a
    non-editable install holds a copy of older kernels, an editable one maps d2v.kernels to its own
    checkout), so the report is about the kernels in that tree. Returns d2v.kernels."""
    import importlib.util

    root = os.path.abspath(root)
    if not os.path.isdir(os.path.join(root, "d2v")):
        raise HarnessError(f"{root} has no d2v/ (pass the repository root with --source)")
    sys.path.insert(0, root)
    import d2v

    if os.path.dirname(os.path.abspath(d2v.__file__)) != os.path.join(root, "d2v"):
        raise HarnessError(f"d2v was imported from {d2v.__file__}, not from {root}")
    kdir = os.path.join(root, "d2v", "kernels")
    if not os.path.isdir(kdir):  # the repository layout: kernels/ installed as d2v.kernels
        kdir = os.path.join(root, "kernels")
        spec = importlib.util.spec_from_file_location("d2v.kernels", os.path.join(kdir, "__init__.py"),
                                                      submodule_search_locations=[kdir])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["d2v.kernels"] = mod
        spec.loader.exec_module(mod)
        d2v.kernels = mod
    import d2v.kernels

    return d2v.kernels


def _vit_b_ema_shapes(root: str) -> list[tuple[int, ...]]:
    """Shapes of the tensors the ViT-B teacher's EMA updates: EMATeacher's own pairing (the student's
    trainable params the teacher keeps), so a change to the teacher's contents is picked up. Built on
    the CPU (about 5 s): the meta device would be free of memory but pulls in torch._dynamo for its
    arange, which takes longer."""
    import torch

    from d2v.config import load_config
    from d2v.ema import EMATeacher
    from d2v.model import build_model

    cfg = load_config(os.path.join(root, "configs", "base_image.yaml"))
    with torch.no_grad():
        student = build_model(cfg)
        teacher = EMATeacher(student, 0.999, 0.9999, 1000)  # decays do not matter here
    return [tuple(teacher._src[i].shape) for i in teacher._avg]


def _launch(case: Case, cache: dict, root: str) -> None:
    """Call the project's launcher for one case with uninitialized CPU tensors of the real shapes."""
    import torch
    from d2v.kernels import build_targets as kt
    from d2v.kernels import ema_update as ke
    from d2v.kernels import masked_gather as kg

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "i64": torch.int64,
          "i32": torch.int32}
    s = SHAPES[case.model]
    R, N = s.B * s.M, s.T - s.K
    e = torch.empty
    ids = dt[case.ids]
    if case.op == "keep-gather":  # student input: rows repeated per clone, then the kept tokens
        kg.gather_triton(e(R, s.T, s.D, dtype=dt[case.dt]), e(R, s.K, dtype=ids), 1)
    elif case.op == "pred-gather":  # decoder output (R, T, D) at the masked tokens
        kg.gather_triton(e(R, s.T, s.D, dtype=dt[case.dt]), e(R, N, dtype=ids), 1)
    elif case.op == "clone-targets":  # targets (B, T, D) indexed per clone row
        kg.gather_triton(e(s.B, s.T, s.D, dtype=dt[case.dt]), e(R, N, dtype=ids), s.M)
    elif case.op == "dec-scatter":  # encoder output x[:, E:] (a strided view) put back into the noise
        src = e(R, s.E + s.K, s.D, dtype=dt[case.dt])[:, s.E:]
        kg.scatter_triton(src, e(R, s.K, dtype=ids), e(R, s.T, s.D, dtype=dt[case.dt2]))
    elif case.op == "gather-bwd":  # gradient of the masked-token gather
        kg.gather_backward_triton(e(R, N, s.D, dtype=dt[case.dt]), e(R, N, dtype=ids), s.T)
    elif case.op == "fill-grad":  # gradient of the decoder-input scatter w.r.t. the noise
        kg.scatter_fill_grad_triton(e(R, s.T, s.D, dtype=dt[case.dt]), e(R, s.K, dtype=ids), dt[case.dt2])
    elif case.op == "targets":  # the teacher's top L layers, extra tokens stripped (strided views)
        layers = [e(s.B, s.E + s.T, s.D, dtype=dt[case.dt])[:, s.E:] for _ in range(s.L)]
        kt.build_targets_triton(layers, instance_norm=True, final_norm=case.final)
    elif case.op in ("ema", "ema-tails"):
        if "ema_shapes" not in cache:
            cache["ema_shapes"] = _vit_b_ema_shapes(root)
        shapes = cache["ema_shapes"] + ([(17,), (1,)] if case.op == "ema-tails" else [])
        ema = [e(sh, dtype=torch.float32) for sh in shapes]
        par = [e(sh, dtype=dt[case.dt]) for sh in shapes]
        low = [e(sh, dtype=dt[case.dt2]) for sh in shapes] if case.dt2 else None
        ke.ema_update_triton_(ema, par, 0.999, low)
    else:
        raise HarnessError(f"unknown op {case.op!r}")


def run_worker(arch: int, names: list[str], dump: str | None, side_cache: str | None,
               root: str = ROOT) -> dict:
    """Compile every case for one arch in this process; returns rows and harness errors."""
    if interpreting():
        raise HarnessError("TRITON_INTERPRET is set")
    import triton
    from triton.runtime import driver

    try:
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v; captured per compile
    except Exception:
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # older Triton: a rerun of ptxas fills in
    driver.set_active(_StubDriver(arch))
    import_source(root)
    from d2v.kernels import _triton

    if not hasattr(_triton, "check_launchable"):
        raise HarnessError("d2v.kernels._triton.check_launchable is gone: the harness lets the launchers "
                           "take CPU tensors by replacing it; update run_worker")
    # the launchers refuse CPU tensors outside the interpreter; here nothing is launched
    _triton.check_launchable = lambda *a, **k: None
    rec = _Recorder(arch, dump, side_cache)
    rec.install()
    by_name = {c.name: c for c in CASES}
    errors, cache = [], {}
    for name in names:
        t0 = time.time()
        rec.case = name
        n0 = len(rec.rows)
        try:
            _launch(by_name[name], cache, root)
        except _CompileFailed as e:
            rec.rows.append(Row(arch=arch, case=name, kernel=e.kernel, error=str(e)))
        except Exception as e:
            errors.append(f"sm_{arch} {name}: {type(e).__name__}: {e}")
        print(f"[sm_{arch}] {name}: {len(rec.rows) - n0} kernel(s), {time.time() - t0:.1f} s",
              file=sys.stderr, flush=True)
    rec.save()
    return {"arch": arch, "triton": triton.__version__, "ptxas": _ptxas_version(arch),
            "kernels": os.path.dirname(os.path.abspath(_triton.__file__)),
            "rows": [asdict(r) for r in rec.rows], "errors": errors}


def _source_state(path: str) -> str:
    """Where the compiled kernels came from: the directory, its commit, and whether it has uncommitted
    changes (the report of a kernel being rewritten should say so)."""
    if not path or path == "?":
        return "?"
    with contextlib.suppress(Exception):
        def git(*cmd):
            res = subprocess.run(["git", "-C", path, *cmd], capture_output=True, text=True, check=True)
            return res.stdout

        sha, dirty = git("rev-parse", "--short", "HEAD").strip(), git("status", "--porcelain", ".").strip()
        top = git("rev-parse", "--show-toplevel").strip()
        path = os.path.relpath(path, top) + "/" if top else path  # no machine path in a committed report
        return f"{path} (commit {sha}{', with uncommitted changes' if dirty else ''})"
    return path


def _ptxas_version(arch: int) -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run([_ptxas_path(arch), "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
        return m.group(2) if m else out.strip().splitlines()[-1]
    return "?"


# ------------------------------------------------------------------------------------ report


def _access_cell(row: dict, op: str, kind: str) -> str:
    """e.g. "8x16B, 4x4B": instruction count per width; the index cell also lists aux accesses."""
    cells = []
    for k in (kind, "aux") if kind == "index" else (kind,):
        by_bytes: Counter = Counter()
        for a in row["accesses"]:
            if a["op"] == op and a["kind"] == k:
                by_bytes[a["bytes"]] += a["count"]
        tag = " aux" if k == "aux" else ""
        cells += [f"{n}x{b}B{tag}" for b, n in sorted(by_bytes.items(), reverse=True)]
    return ", ".join(cells) or "-"


def markdown(result: dict, violations: list[tuple[dict, str]], seconds: float) -> str:
    rows = result["rows"]
    bad = {(v[0]["arch"], v[0]["case"], v[0]["kernel"]) for v in violations}
    lines = [
        "# Triton AOT check (compiled without a GPU)",
        "",
        f"kernels: {_source_state(result.get('kernels', '?'))}",
        "",
        f"triton {result['triton']}, ptxas {result['ptxas']}; {len(rows)} kernel compiles in "
        f"{len({r['case'] for r in rows})} cases; {len(violations)} violation(s); {seconds:.0f} s.",
        "Access counts are static PTX instructions per kernel (an access inside a loop counts once), by "
        "width in bytes; index = id tables, the inverse map, the EMA's chunk/address tables (exempt from "
        "the width rule, as are accesses marked aux). Rules: no spills; every data access at least "
        f"{VECTOR_BYTES} B wide unless TAILS accepts it; shared memory within the arch's limit.",
        "",
    ]
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        lines += [f"## sm_{arch}", "",
                  "| case | kernel | grid | warps | regs | spill st/ld (B) | smem (B) | ld data | ld index "
                  "| st data | st index | check |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["arch"] != arch:
                continue
            ok = "**FAIL**" if (r["arch"], r["case"], r["kernel"]) in bad else "ok"
            if r["error"]:
                lines.append(f"| {r['case']} | {r['kernel']} |" + " - |" * 9 + " **FAIL** |")
                continue
            lines.append(
                f"| {r['case']} | {r['kernel']} | {r['grid']} | {r['num_warps']} | {r['regs']} | "
                f"{r['spill_st']}/{r['spill_ld']} | {r['smem']} | {_access_cell(r, 'ld', 'data')} | "
                f"{_access_cell(r, 'ld', 'index')} | {_access_cell(r, 'st', 'data')} | "
                f"{_access_cell(r, 'st', 'index')} | {ok} |")
        lines.append("")
    if violations:
        lines += ["## Violations", ""]
        lines += [f"- sm_{r['arch']} `{r['case']}` `{r['kernel']}`: {msg}" for r, msg in violations]
        lines.append("")
    if result["errors"]:
        lines += ["## Harness errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    return "\n".join(lines)


CSV_FIELDS = ["arch", "case", "kernel", "grid", "num_warps", "num_stages", "regs", "spill_st", "spill_ld",
              "stack", "smem", "ld_data", "ld_index", "st_data", "st_index", "forms", "hash", "violations"]


def write_csv(path: str, result: dict, violations: list[tuple[dict, str]]) -> None:
    why: dict = {}
    for r, msg in violations:
        why.setdefault((r["arch"], r["case"], r["kernel"]), []).append(msg)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in result["rows"]:
            forms = ";".join(f"{a['op']}.{a['kind']}.{a['form']}:{a['count']}@{a['args']}"
                             for a in r["accesses"])
            msgs = why.get((r["arch"], r["case"], r["kernel"]), [r["error"]] if r["error"] else [])
            cells = {f"{op}_{kind}": _access_cell(r, op, kind)
                     for op in ("ld", "st") for kind in ("data", "index")}
            w.writerow({**{k: r.get(k) for k in CSV_FIELDS if k in r}, **cells, "forms": forms,
                        "violations": " | ".join(msgs)})


# ------------------------------------------------------------------------------------ main


def _run_archs(archs: list[int], names: list[str], jobs: int, dump: str | None, cache_dir: str | None,
               source: str) -> dict:
    """One worker process per arch (a process's Triton binds one target), `jobs` at a time."""
    tmp = None if cache_dir else tempfile.mkdtemp(prefix="d2v-aot-")
    try:
        pending, running, results = list(archs), [], []
        while pending or running:
            while pending and len(running) < jobs:
                arch = pending.pop(0)
                base = cache_dir or os.path.join(tmp, f"sm{arch}")
                os.makedirs(base, exist_ok=True)
                out = os.path.join(tmp or base, f"result-sm{arch}.json")
                env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(base, "triton"))
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(arch), "--worker-out", out,
                       "--side-cache", os.path.join(base, f"ptxas-sm{arch}.json")]
                cmd += (["--dump", dump] if dump else []) + ["--source", source, "--cases-exact", *names]
                running.append((arch, out, subprocess.Popen(cmd, env=env)))
            time.sleep(0.2)
            for item in list(running):
                arch, out, proc = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode == 0 and os.path.exists(out):
                    with open(out) as f:
                        results.append(json.load(f))
                else:
                    results.append({"arch": arch, "triton": "?", "ptxas": "?", "rows": [],
                                    "errors": [f"sm_{arch}: worker exited with status {proc.returncode}"]})
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    results.sort(key=lambda r: -r["arch"])
    first = results[0] if results else {}
    merged = {"triton": first.get("triton", "?"), "kernels": first.get("kernels", "?"),
              "ptxas": ", ".join(sorted({r["ptxas"] for r in results})) or "?", "rows": [], "errors": []}
    for r in results:
        merged["rows"] += r["rows"]
        merged["errors"] += r["errors"]
    return merged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", type=int, choices=ARCHS, help="compute capability; repeat for "
                   "more (default: 90 and 80)")
    p.add_argument("--quick", action="store_true", help="a few representative cases only")
    p.add_argument("--cases", nargs="+", metavar="GLOB", help="only cases whose name matches (see --list)")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--out", metavar="FILE.md", help="also write the markdown report here (and a CSV "
                   "beside it)")
    p.add_argument("--csv", metavar="FILE.csv", help="CSV path (default: --out with .csv)")
    p.add_argument("--json", metavar="FILE.json", help="raw results (rows, violations) as JSON")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="arch workers in parallel")
    p.add_argument("--dump", metavar="DIR", help="write each kernel's PTX/TTIR/TTGIR under DIR/sm<arch>/")
    p.add_argument("--cache-dir", metavar="DIR", help="keep Triton's cache here between runs (default: a "
                   "fresh temporary one, so every kernel is compiled)")
    p.add_argument("--source", default=ROOT, metavar="DIR", help="checkout whose d2v/ and kernels/ are "
                   "compiled (default: the one holding this tool; e.g. an export of HEAD to compare with)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--side-cache", help=argparse.SUPPRESS)
    p.add_argument("--cases-exact", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.list:
        for c in CASES:
            print(("* " if c.quick else "  ") + c.name)
        return 0
    if interpreting():
        print("aot_check: TRITON_INTERPRET is set: Triton would run its CPU interpreter instead of compiling "
              "for a GPU, and the stub driver must not replace it. Run with it unset, e.g. "
              "`env -u TRITON_INTERPRET .venv/bin/python tools/aot_check.py`.", file=sys.stderr)
        return 2
    if a.worker is not None:
        try:
            res = run_worker(a.worker, a.cases_exact or [], a.dump, a.side_cache, a.source)
        except Exception as e:  # the whole worker failed: report it as a harness error
            res = {"arch": a.worker, "triton": "?", "ptxas": "?", "rows": [],
                   "errors": [f"sm_{a.worker}: {type(e).__name__}: {e}"]}
        with open(a.worker_out, "w") as f:
            json.dump(res, f)
        return 0

    cases = select_cases(a.cases, a.quick)
    if not cases:
        print("aot_check: no case matches (see --list)", file=sys.stderr)
        return 2
    archs = a.arch or list(ARCHS)
    t0 = time.time()
    result = _run_archs(list(dict.fromkeys(archs)), [c.name for c in cases], max(1, a.jobs), a.dump,
                        a.cache_dir, os.path.abspath(a.source))
    seconds = time.time() - t0
    violations = [(r, msg) for r in result["rows"] for msg in check_row(Row(**r))]
    md = markdown(result, violations, seconds)
    print(md)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    csv_path = a.csv or (os.path.splitext(a.out)[0] + ".csv" if a.out else None)
    if csv_path:
        write_csv(csv_path, result, violations)
    if a.json:
        found = [{"arch": r["arch"], "case": r["case"], "kernel": r["kernel"], "what": m}
                 for r, m in violations]
        with open(a.json, "w") as f:
            json.dump({**result, "violations": found, "seconds": seconds}, f, indent=1)
    if result["errors"]:
        print(f"aot_check: {len(result['errors'])} harness error(s)", file=sys.stderr)
        return 2
    if violations:
        print(f"aot_check: {len(violations)} violation(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
