"""tools/aot_check.py: the PTX/ptxas parsing and the rules on hand-written inputs, and one real compile of
one small kernel for sm_90 through the stub driver (in a subprocess: this test session runs Triton's
interpreter, which the harness refuses).

Run: .venv/bin/python -m pytest -q tests/test_aot_check.py
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "aot_check.py"
_spec = importlib.util.spec_from_file_location("aot_check", TOOL)
aot = importlib.util.module_from_spec(_spec)
sys.modules["aot_check"] = aot  # dataclasses resolve their module by name
_spec.loader.exec_module(aot)

# A gather-like kernel: param 0 data (bf16), param 1 ids (int64), param 2 out; the row address goes
# through shared memory (a layout conversion), the ids are loaded narrow, one data load is narrow, and a
# second "table" param holds addresses that are loaded and then dereferenced (the EMA's pattern).
PTX = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u64 .ptr .global .align 1 k_param_2,
	.param .u32 k_param_3,
	.param .u64 .ptr .global .align 1 k_param_4
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b64 	%rd2, [k_param_1];
	ld.param.b64 	%rd3, [k_param_2];
	ld.param.b32 	%r1, [k_param_3];
	ld.param.b64 	%rd30, [k_param_4];
	mad.wide.s32 	%rd4, %r1, 8, %rd2;
	// begin inline asm
	@%p1 ld.global.b64 { %rd5 }, [ %rd4 + 0 ];
	// end inline asm
	shl.b64 	%rd6, %rd5, 1;
	add.s64 	%rd7, %rd1, %rd6;
	st.shared.b64 [ %r9 + 0 ], %rd7;
	ld.shared.b64 	%rd8, [%r9];
	@%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd8 + 0 ];
	@%p1 ld.global.b32 { %r6 }, [ %rd8 + 16 ];
	add.s64 	%rd9, %rd3, %rd6;
	@%p1 st.global.v4.b32 [ %rd9 + 0 ], { %r2, %r3, %r4, %r5 };
	ld.global.b64 { %rd31 }, [ %rd30 + 0 ];
	add.s64 	%rd32, %rd31, %rd6;
	@%p1 ld.global.L1::evict_last.v2.b64 { %rd33, %rd34 }, [ %rd32 + 0 ];
	cp.async.cg.shared.global [ %r10 + 0 ], [ %rd9 + 0 ], 0x10, %r11;
	ret;
}
"""
ARGS = [("x_ptr", "!tt.ptr<bf16>"), ("ids_ptr", "!tt.ptr<i64>"), ("out_ptr", "!tt.ptr<bf16>"), ("K", "i32"),
        ("addr_ptr", "!tt.ptr<i64>")]


def _summary():
    accesses, is_ptr = aot.analyze_ptx(PTX)
    assert is_ptr == {0: True, 1: True, 2: True, 3: False, 4: True}
    rule = aot.Rule("k", "test")
    return accesses, aot.summarize_accesses(accesses, ARGS, rule)


def test_ptx_accesses_are_traced_to_their_parameters():
    accesses, summary = _summary()
    got = {(s["op"], s["kind"], s["form"], s["bytes"], s["args"]): s["count"] for s in summary}
    assert got == {
        ("ld", "index", "b64", 8, "ids_ptr"): 1,
        ("ld", "index", "b64", 8, "addr_ptr"): 1,
        ("ld", "data", "v4.b32", 16, "x_ptr"): 1,  # through shared memory, not from ids_ptr
        ("ld", "data", "b32", 4, "x_ptr"): 1,
        ("ld", "data", "v2.b64", 16, "*(ids_ptr+addr_ptr)"): 1,  # an address loaded from a table
        ("ld", "data", "cp16", 16, "out_ptr"): 1,
        ("st", "data", "v4.b32", 16, "out_ptr"): 1,
    }, summary


def test_rules_flag_narrow_data_and_spills(monkeypatch):
    _, summary = _summary()
    row = aot.Row(arch=90, case="m/op/bf16", kernel="gather_kernel", regs=255, spill_st=8, spill_ld=4, smem=0,
                  accesses=summary)
    msgs = aot.check_row(row)
    assert any("spills 8 B stores / 4 B loads" in m for m in msgs), msgs
    assert any("1 data loads narrower than 16 B: 1 x ld.global.b32 (4 B) from x_ptr" in m for m in msgs), msgs
    assert not any("index" in m or "stores narrower" in m for m in msgs), msgs
    monkeypatch.setattr(aot, "TAILS", (aot.Tail("gather_kernel", 1, "masked tail", op="ld"),))
    row.spill_st = row.spill_ld = 0
    assert aot.check_row(row) == []
    row.smem = 300_000
    assert any("shared memory" in m for m in aot.check_row(row))


def test_aux_arguments_are_reported_but_not_width_checked():
    accesses, _ = aot.analyze_ptx(PTX)
    summary = aot.summarize_accesses(accesses, ARGS, aot.Rule("k", "test", aux_args=("x_ptr",)))
    x = {(s["op"], s["kind"], s["bytes"]) for s in summary if s["args"] == "x_ptr"}
    assert x == {("ld", "aux", 16), ("ld", "aux", 4)}
    row = aot.Row(arch=90, case="c", kernel="k", regs=32, spill_st=0, spill_ld=0, smem=0, accesses=summary)
    assert aot.check_row(row) == []  # rule_for("k") is the default rule; aux was decided when summarizing
    assert aot._access_cell(row.__dict__, "ld", "index") == "2x8B, 1x16B aux, 1x4B aux"


def test_unknown_kernel_is_held_to_the_default_rule():
    assert aot.rule_for("some_new_kernel").family == "other"
    assert aot.rule_for("some_new_kernel").data_bytes == 16
    assert aot.rule_for("targets_stats_kernel").family == "targets"
    _, summary = _summary()
    row = aot.Row(arch=80, case="c", kernel="some_new_kernel", regs=32, spill_st=0, spill_ld=0, smem=0,
                  accesses=summary)
    assert len(aot.check_row(row)) == 1


def test_ptxas_log_is_parsed_per_entry():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'targets_kernel' for 'sm_90a'
ptxas info    : Function properties for targets_kernel
    548 bytes stack frame, 548 bytes spill stores, 540 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 548 bytes cumulative stack size, 448 bytes cmem[0]
ptxas info    : Compiling entry function 'gather_kernel' for 'sm_80'
ptxas info    : Function properties for gather_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 48 registers, 392 bytes cmem[0]
"""
    info = aot.parse_ptxas_log(log)
    assert info["targets_kernel"] == {"regs": 255, "spill_st": 548, "spill_ld": 540, "stack": 548}
    assert info["gather_kernel"] == {"regs": 48, "spill_st": 0, "spill_ld": 0, "stack": 0}


def test_ttir_and_signature_arguments():
    ttir = ('tt.func public @t(%layers: !tt.ptr<bf16> {tt.divisibility = 16 : i32} loc("layers"(#loc)), '
            '%layers_0: !tt.ptr<bf16> loc("layers"(#loc)), %T: i32 loc("T"(#loc))) attributes {} {')
    assert aot.ttir_args(ttir, "t") == [("layers", "!tt.ptr<bf16>"), ("layers_0", "!tt.ptr<bf16>"),
                                        ("T", "i32")]
    sig = {"layers": ("*bf16", "*bf16"), "s_d": "constexpr", "T": "i32", "K": "constexpr"}
    assert aot.signature_args(sig) == [("layers.0", "*bf16"), ("layers.1", "*bf16"), ("T", "i32")]
    assert aot.pointee("!tt.ptr<i64>") == "i64" and aot.pointee("*fp32") == "fp32"
    assert aot.pointee("i32") is None


def test_case_names_are_unique_and_quick_is_a_subset():
    names = [c.name for c in aot.CASES]
    assert len(names) == len(set(names))
    quick = [c.name for c in aot.select_cases(None, quick=True)]
    assert quick and set(quick) < set(names)
    assert aot.select_cases(["vit-b/ema/*"], quick=False)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def test_refuses_under_the_interpreter():
    res = subprocess.run([sys.executable, str(TOOL), "--quick"], capture_output=True, text=True, cwd=ROOT,
                         env=_env(TRITON_INTERPRET="1"), timeout=60)
    assert res.returncode == 2
    assert "TRITON_INTERPRET" in res.stderr


def test_compiles_one_kernel_for_sm90(tmp_path):
    """The real path: stub driver, forced warmup, ptxas -v captured, PTX widths classified."""
    pytest.importorskip("triton")
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(TOOL), "--arch", "90", "--cases", "vit-b/keep-gather/bf16",
                          "--json", str(out), "--out", str(tmp_path / "r.md")],
                         capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert res.returncode in (0, 1), (res.stdout + res.stderr)[-4000:]
    data = json.loads(out.read_text())
    assert not data["errors"]
    (row,) = data["rows"]
    assert row["arch"] == 90 and row["kernel"] == "gather_kernel" and row["num_warps"] >= 1
    assert isinstance(row["regs"], int) and 0 < row["regs"] <= 255
    assert isinstance(row["spill_st"], int) and isinstance(row["spill_ld"], int)
    kinds = {(a["op"], a["kind"], a["args"]) for a in row["accesses"]}
    assert ("ld", "index", "ids_ptr") in kinds and ("ld", "data", "x_ptr") in kinds
    assert ("st", "data", "out_ptr") in kinds
    assert all(a["bytes"] in (1, 2, 4, 8, 16, 32) for a in row["accesses"])
    assert "| vit-b/keep-gather/bf16 | gather_kernel |" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.csv").exists()
