"""The build: knob parsing in setup.py (no build needed), and the extension without a GPU."""
from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import pytest
import torch

from _util import HAS_CUDA, load_file_module, requires_ext

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_mod():
    return load_file_module("sjd_setup_under_test", ROOT / "setup.py")   # setup() itself only runs as __main__


def _fake_nvcc(tmp_path: Path) -> str:
    p = tmp_path / "cuda" / "bin" / "nvcc"
    p.parent.mkdir(parents=True)
    p.write_text("#!/bin/sh\nexit 0\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


# ---------------------------------------------------------------- knobs (setup.py), no build

@pytest.mark.parametrize("value,want", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("AUTO", "auto"),
                                        ("1", "1"), ("true", "1"), ("ON", "1"), ("yes", "1"),
                                        ("0", "0"), ("false", "0"), ("off", "0"), (" no ", "0")])
def test_parse_build_cuda(setup_mod, value, want):
    assert setup_mod.parse_build_cuda(value) == want


@pytest.mark.parametrize("value", ["2", "maybe", "cuda", "-1"])
def test_parse_build_cuda_rejects_typos(setup_mod, value):
    with pytest.raises(ValueError, match="SJD_BUILD_CUDA"):
        setup_mod.parse_build_cuda(value)


@pytest.mark.parametrize("value,want", [(None, ["80", "90", "90a"]), ("", ["80", "90", "90a"]), ("90", ["90"]),
                                        ("80;90a", ["80", "90a"]), ("sm_90a, 8.0", ["90a", "80"]),
                                        ("90 90 120", ["90", "120"]), ("compute_100a", ["100a"])])
def test_parse_archs(setup_mod, value, want):
    assert setup_mod.parse_archs(value) == want


@pytest.mark.parametrize("value", ["70", "sm_60", "hopper", "9x", ";"])
def test_parse_archs_rejects(setup_mod, value):
    with pytest.raises(ValueError, match="SJD_CUDA_ARCHS"):
        setup_mod.parse_archs(value)


def test_parse_jobs(setup_mod):
    assert setup_mod.parse_jobs(None) == 2
    assert setup_mod.parse_jobs("8") == 8
    for bad in ("0", "x", "-3"):
        with pytest.raises(ValueError, match="SJD_BUILD_JOBS"):
            setup_mod.parse_jobs(bad)


def test_plan_skip_when_disabled(setup_mod, tmp_path):
    env = {"SJD_BUILD_CUDA": "0", "CUDACXX": _fake_nvcc(tmp_path)}
    plan = setup_mod.build_plan(env, system_paths=[])
    assert plan["build"] is False and "SJD_BUILD_CUDA=0" in plan["reason"]


def test_plan_auto_without_nvcc_skips_and_says_why(setup_mod):
    plan = setup_mod.build_plan({"PATH": ""}, system_paths=[])
    assert plan["build"] is False
    assert "nvcc not found" in plan["reason"] and "not built" in plan["reason"]


def test_plan_force_without_nvcc_fails_loudly(setup_mod):
    with pytest.raises(RuntimeError, match="SJD_BUILD_CUDA=1 but nvcc not found"):
        setup_mod.build_plan({"SJD_BUILD_CUDA": "1", "PATH": ""}, system_paths=[])


def test_plan_builds_with_nvcc_and_archs(setup_mod, tmp_path):
    nvcc = _fake_nvcc(tmp_path)
    for env in ({"CUDACXX": nvcc}, {"CUDA_HOME": str(tmp_path / "cuda")}, {"PATH": str(Path(nvcc).parent)}):
        plan = setup_mod.build_plan({**env, "SJD_CUDA_ARCHS": "90", "SJD_BUILD_JOBS": "3"}, system_paths=[])
        assert plan["build"] is True
        assert plan["nvcc"] == os.path.realpath(nvcc)
        assert plan["archs"] == ["90"] and plan["jobs"] == 3
        assert "sm_90" in plan["reason"]


def test_nvcc_wrapper_is_unwrapped(setup_mod, tmp_path):
    real = _fake_nvcc(tmp_path)
    wrap = tmp_path / "wrapbin" / "nvcc"
    wrap.parent.mkdir()
    wrap.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrap.chmod(wrap.stat().st_mode | stat.S_IXUSR)
    nvcc, tried = setup_mod.find_nvcc({"PATH": str(wrap.parent)}, system_paths=[])
    assert nvcc == os.path.realpath(real) and tried[-1] == "PATH"


def test_malformed_knob_fails_the_plan(setup_mod, tmp_path):
    with pytest.raises(ValueError):
        setup_mod.build_plan({"CUDACXX": _fake_nvcc(tmp_path), "SJD_CUDA_ARCHS": "sm_61"}, system_paths=[])


def test_cmake_default_archs_match_setup(setup_mod):
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r'set\(SJD_CUDA_ARCHS "([^"]+)"', text)
    assert m and m.group(1).split(";") == list(setup_mod.DEFAULT_ARCHS)


def test_torch_is_not_a_build_requirement():
    import tomllib
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(r.lower().startswith("torch") for r in meta["build-system"]["requires"])
    assert meta["project"]["name"] == "sjd_kernels"
    assert {"triton", "dev"} <= set(meta["project"]["optional-dependencies"])


# ---------------------------------------------------------------- the built extension, no GPU needed

@requires_ext
def test_extension_imports_and_reports():
    from sjd_kernels._ext import ext
    C = ext()
    archs = C.built_archs()
    assert archs and all(isinstance(a, str) and re.fullmatch(r"\d{2,3}[af]?", a) for a in archs)
    n = C.device_count()
    assert isinstance(n, int) and n >= 0
    assert isinstance(C.device_error(), str)
    assert C.runtime_version() >= 12000
    want = os.environ.get("SJD_CUDA_ARCHS")
    if want:                              # the build says what it built, and built what was asked
        assert archs == load_file_module("sjd_setup_archs", ROOT / "setup.py").parse_archs(want)


@requires_ext
def test_backends_reports_archs_and_devices():
    import sjd_kernels as sk
    from sjd_kernels._ext import ext
    info = sk.backends()["cuda"]
    for a in ext().built_archs():
        assert f"sm_{a}" in info["why"]
    if ext().device_count() == 0:
        assert info["available"] is False
        assert "no CUDA device is visible" in info["why"]
    else:
        assert info["available"] is True


def _no_device():
    from sjd_kernels._ext import _C
    return _C is None or _C.device_count() == 0


@requires_ext
def test_entry_points_raise_clearly_without_device():
    from sjd_kernels._ext import ext
    C = ext()
    if C.device_count() > 0:
        pytest.skip("a CUDA device is visible; this checks the no-device path")
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        C.philox_fill(0, 16, 1, 2, 3, 4, 0)
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        C.jacobi_step_max_smem_lanes(0)
    args = dict(dtype=0, logits=1, logits_sb=8, logits_sj=4, uncond=0, uncond_sb=0, uncond_sj=0, cfg_scale=0,
                drafts=1, win_len=1, pos=1, seed=1, step=1, forced=0, forced_len=0, q_state=1, q_kind=1, p_prev=0,
                status=1, B=1, W=1, V=4, R=2, temperature=1.0, top_k=0, top_p=1.0, mode=0, beta=0.0, vp_form=0,
                vp_eps=1e-6, tail_init=0, num_accepted=1, tokens=1, next_drafts=1, scratch=1, rowbuf=0, device=0,
                stream=0)
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        C.jacobi_step(**args)
    with pytest.raises(ValueError, match="mode"):        # argument checks come first, as ValueError
        C.jacobi_step(**{**args, "mode": 9})
    with pytest.raises(ValueError, match="features"):
        C.jacobi_step(**{**args, "features": 8})
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):    # the optional paths are accepted
        C.jacobi_step(**{**args, "features": 7})
    targs = dict(dtype=0, logits=1, logits_sb=8, logits_sn=4, uncond=0, uncond_sb=0, uncond_sn=0, cfg_scale=0,
                 tokens=1, parent=1, depth=1, sib=1, q_slot=1, pos=1, seed=1, step=1, forced=0, forced_len=0,
                 q_state=1, q_kind=1, status=1, B=1, N=2, V=4, R=2, max_depth=1, temperature=1.0, top_k=0,
                 top_p=1.0, num_accepted=1, path=1, out_tokens=1, rowflag=1, rowbuf=0, device=0, stream=0)
    with pytest.raises(ValueError, match="features"):
        C.tree_verify(**{**targs, "features": 8})
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        C.tree_verify(**{**targs, "features": 5})


@requires_ext
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only path")
def test_cuda_backend_on_cpu_tensors_is_an_input_error():
    import sjd_kernels as sk
    from sjd_kernels.cuda.jacobi_step import jacobi_step_cuda
    st = sk.JacobiState.create(1, 2, 8, seed=[1])
    logits = torch.randn(1, 3, 8)
    with pytest.raises(sk.SJDInputError, match="CUDA tensors"):
        jacobi_step_cuda(logits, None, None, torch.zeros(1, 2, dtype=torch.int64), torch.tensor([2]),
                         torch.tensor([0]), st.seed, st.step, None, st.q_state, st.q_kind, st.p_prev, st.status,
                         1.0, 0, 1.0, 0, 0.0, 0, 1e-6, 0)


def test_required_extension_is_present_when_ci_asks():
    """With SJD_REQUIRE_EXT=1 the extension must import (catches an install that skipped the build)."""
    if os.environ.get("SJD_REQUIRE_EXT", "0") != "1":
        pytest.skip("SJD_REQUIRE_EXT is not set")
    from sjd_kernels import _ext
    assert _ext._C is not None, f"sjd_kernels._C missing: {_ext._ERR}"
    assert Path(_ext._C.__file__).name.startswith("_C"), _ext._C.__file__
    assert "sjd_kernels" in sys.modules


def test_kernel_features_knob():
    # no GPU needed: an unknown name is refused; the launcher's bit mask follows the innermost
    # setting, which is restored on exit
    import sjd_kernels.cuda.jacobi_step as cj
    with pytest.raises(ValueError, match="unknown kernel feature"):
        cj.kernel_features("radix")
    with cj.kernel_features("bracket_topk", "list_races"):
        assert cj._feature_mask() == 3
        with cj.kernel_features("list_races"):
            assert cj._feature_mask() == 2
        assert cj._feature_mask() == 3
    assert cj.FEATURES == frozenset() and cj._feature_mask() == 0
