"""Shared fixtures: the eos share folder, and throw-away copies of this repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPO_FILES = ("dvc.yaml", "params.yaml", "prefect.toml", ".dvcignore")
REPO_DIRS = ("facedetail", "stages", "flows")
SHARE_REL = Path("data/external/eos-share")

os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")


def _find_share() -> Path | None:
    candidates = [os.environ.get("FACEDETAIL_ASSET_MIRROR"), ROOT / SHARE_REL, ROOT.parent / "shared/assets/eos-share"]
    for c in candidates:
        if c and (Path(c) / "sfm_shape_3448.bin").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def eos_share() -> Path:
    """Folder with the eos share files (Surrey Face Model); tests skip if it is nowhere."""
    share = _find_share()
    if share is None:
        pytest.skip("eos share files not found: run `make assets` or set FACEDETAIL_ASSET_MIRROR")
    return share


def tool_env() -> dict[str, str]:
    """Environment in which `python`, `dvc` and `git` resolve to this virtualenv's tools."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "facedetail-tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@facedetail.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "facedetail-tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@facedetail.invalid")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def sh(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command with :func:`tool_env`; on failure show its output."""
    proc = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_repo(dest: Path, share: Path, *, dvc: bool = True) -> Path:
    """A fresh git (+ DVC) repository holding this project's pipeline code and the eos share files."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in REPO_FILES:
        shutil.copy2(ROOT / name, dest / name)
    for name in REPO_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(share, dest / SHARE_REL)
    (dest / ".gitignore").write_text("/data/external/\n/data/lineage/\n__pycache__/\n")
    sh(["git", "init", "-q", "-b", "main"], dest)
    if dvc:
        sh(["dvc", "init", "-q"], dest)
        sh(["dvc", "config", "core.analytics", "false"], dest)
        shutil.copytree(ROOT / ".dvc" / "plots", dest / ".dvc" / "plots")  # the project's plot templates
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-q", "-m", "pipeline"], dest)
    return dest


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory, eos_share: Path) -> Path:
    """A git + DVC repository with the smallest profile built by one `dvc repro` of every stage.

    Shared by the whole-pipeline tests (the run takes about a minute): treat it as read-only and
    :func:`copy_repo` it to change anything.
    """
    repo = make_repo(tmp_path_factory.mktemp("tiny-pipeline") / "repo", eos_share)
    shrink_params(repo)
    sh(["dvc", "repro"], repo)
    return repo


def copy_repo(src: Path, dest: Path) -> Path:
    """A copy of a repository (git, DVC cache, outputs) to change without touching ``src``."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def tree_hashes(root: Path, *parts: str) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root/part`` for each part."""
    from facedetail.io.hashing import sha256_file

    return {p.relative_to(root).as_posix(): sha256_file(p) for part in parts
            for p in sorted((root / part).rglob("*")) if p.is_file()}


@pytest.fixture
def repo(tmp_path: Path, eos_share: Path) -> Path:
    """A throw-away git + DVC repository with the pipeline and the eos share files."""
    return make_repo(tmp_path / "repo", eos_share)


@pytest.fixture(scope="session")
def sfm_model(eos_share: Path):
    """The Surrey Face Model with its blendshapes and synthetic albedo."""
    from facedetail.model import load_model_source

    return load_model_source("sfm", eos_share / "sfm_shape_3448.bin", eos_share)


@pytest.fixture(scope="session")
def model_npz(tmp_path_factory: pytest.TempPathFactory, sfm_model) -> Path:
    """``sfm_model`` saved as the face_model stage writes it."""
    return sfm_model.save(tmp_path_factory.mktemp("face_model") / "model.npz")


TINY_RENDER = {"count": 8, "shard_size": 4, "image_size": 64, "workers": 1, "contact_sheet": 4}
TINY_TRAIN = {"epochs": 2, "batch_size": 8, "lr": 0.001, "weight_decay": 0.0001, "hflip": True, "seed": 2019}
# Renders large enough for dlib's HOG detector (its smallest face is about 80 px).
TINY_FACES = {**TINY_RENDER, "count": 12, "shard_size": 6, "image_size": 192}
# wild_proxy on the tiny wild set: one process, small textures, a short eos comparison.
TINY_PROXY = {"workers": 1, "shard_size": 4, "eos_compare_max": 3, "sheet_faces": 4}


def _merge(into: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def set_params(repo: Path, section: str, **values: object) -> None:
    """Update one section of ``repo/params.yaml`` (nested mappings are merged, not replaced)."""
    import yaml

    data = yaml.safe_load((repo / "params.yaml").read_text())
    _merge(data.setdefault(section, {}), values)
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def shrink_params(repo: Path) -> None:
    """The smallest profile that still runs every stage: for end-to-end tests."""
    set_params(repo, "uv_chart", resolution=TINY_CHART)
    set_params(repo, "face_model", preview_size=64)
    set_params(repo, "render_expressions", **TINY_FACES)
    set_params(repo, "render_faces", workers=1, holdout_fraction=0.25)
    set_params(repo, "emotion_net", train={**TINY_TRAIN})
    set_params(repo, "capture_synth", **TINY_CAPTURE_SYNTH)
    set_params(repo, "capture_gt", **TINY_CAPTURE_GT)
    set_params(repo, "wild_synth", count=6, synth={"image_size": 192, "size_jitter": 0.1}, bad_examples=False,
               contact_sheet=6)
    set_params(repo, "wild_proxy", **TINY_PROXY)
    set_params(repo, "detail_pairs", **TINY_PAIRS)
    set_params(repo, "detail_pca", **TINY_PCA)
    set_params(repo, "train_detail", **TINY_TRAIN_DETAIL)
    set_params(repo, "reconstruct", **TINY_RECONSTRUCT)
    set_params(repo, "evaluate", **TINY_EVALUATE)


# Capture stages (issue 6): one subject x 3 expressions at 192² (1.2 mm texels) from coarse scans
# (1.2 mm edges), with wrinkles and pores widened so that both sample them.
# Photos at 256² (2 per item, rendering the 1.2 mm scan subdivision): ~0.15 s each.
TINY_SYNTH_SET = {"resolution": 192, "scan": {"edge_mm": 1.2}, "photo": {"size": 256},
                  "details": {"wrinkle_width_mm": 1.5, "fold_width_mm": 2.5, "pore_wavelength_mm": [4.0, 8.0]}}
# The stage takes its map resolution from the shared top-level `uv_chart:` section (TINY_CHART in
# shrink_params; pass {"uv_chart": {"resolution": TINY_CHART}} when building the params directly), not from synth.
TINY_CAPTURE_SYNTH = {"subjects": 2, "workers": 1,
                      "synth": {k: v for k, v in TINY_SYNTH_SET.items() if k != "resolution"}}
TINY_CAPTURE_GT = {"workers": 1, "preview_items": 2, "preview_tile": 128,
                   "patches": {"size": 32, "stride": 16, "overlap": 16}}
# The detail path on the tiny chart: 32² patches, a narrow network, two short epochs.
TINY_CHART = 192
TINY_HOLDOUT = {"holdout_fraction": 0.34, "split_seed": 7}  # of s000, s001: s000 held out
TINY_PAIRS = {"workers": 1, "shard_size": 4}
TINY_PCA = {"patch_size": 32, "stride": 16, "overlap": 16, "components": 8, **TINY_HOLDOUT}
TINY_NETWORK = {"patch_size": 32, "generator": {"ngf": 8, "downsamplings": 5}, "fc_hidden": [64, 32],
                "pca_components": 8, "refine": {"ngf": 8, "downsamplings": 3},
                "discriminator": {"ndf": 8, "layers": 2}}
# wild_holdout_fraction 0.5: of the 6 tiny wild photos, some are held out for reconstruct and evaluate.
TINY_TRAIN_DETAIL = {"region_overlap": 16, **TINY_HOLDOUT, "wild_holdout_fraction": 0.5, "preview_patches": 2,
                     "threads": 1,
                     "train": {"network": TINY_NETWORK, "stride": 16, "eval_patches": 16,
                               "schedule": {"epochs": 2, "warmup_epochs": 1, "patches_per_epoch": 16,
                                            "batch_size": 8}}}
# The end product on the tiny chart: one subdivision, small previews, a few samples.
TINY_RECONSTRUCT = {"limit": 2, "subdivision_levels": 1, "preview_size": 64}
TINY_EVALUATE = {"capture_limit": 1, "wild_limit": 2, "mesh_levels": 1, "threads": 1,
                 "surface": {"icp_points": 500, "icp_iterations": 5}}
