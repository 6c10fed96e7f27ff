"""Git plumbing for the retraining flow: commit chosen files on a new branch without a checkout.

The commit is made with a private index (``GIT_INDEX_FILE`` in a temporary folder): the tree is
the current ``HEAD``'s with the named files taken from the working tree, ``git commit-tree``
makes the commit and ``git update-ref`` creates the branch only if it does not exist yet. The
user's working tree, index and current branch are never touched, nothing is checked out, and
nothing is left behind on a crash but an unreferenced object. (A ``git worktree`` would need a
second checkout of the whole repository, and leaves a registered worktree behind when killed.)
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

ZERO = "0" * 40


class GitError(RuntimeError):
    """A git command failed, or a ref is not where the flow expected it."""


def git(root: Path | str, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run ``git -C root args``; its stdout, stripped. Raises :class:`GitError` with git's message."""
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise GitError(f"git {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def resolve(root: Path | str, rev: str) -> str | None:
    """The commit ``rev`` names, or None when it names none."""
    out = git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
    return out or None


def current_branch(root: Path | str) -> str | None:
    """The checked-out branch (``main``), or None with a detached ``HEAD``."""
    out = git(root, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    return out or None


def free_branch_name(root: Path | str, wanted: str) -> str:
    """``wanted``, or ``wanted-2``, ``wanted-3`` ... : the first that is not a branch yet (never overwrite one)."""
    name, n = wanted, 1
    while resolve(root, f"refs/heads/{name}") is not None:
        n += 1
        name = f"{wanted}-{n}"
    return name


def tree_with(root: Path | str, base: str, paths: Sequence[str]) -> str:
    """The tree of commit ``base`` with ``paths`` as they are in the working tree (a private index)."""
    root = Path(root)
    present = [p for p in paths if (root / p).exists()]
    with tempfile.TemporaryDirectory(prefix="retrain-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        git(root, "read-tree", base, env=env)
        if present:
            git(root, "add", "--all", "--", *present, env=env)
        return git(root, "write-tree", env=env)


def tree_of(root: Path | str, rev: str) -> str:
    """The tree of commit ``rev``."""
    return git(root, "rev-parse", f"{rev}^{{tree}}")


def commit_paths(root: Path | str, paths: Sequence[str], branch: str, message: str, *,
                 allow_current_branch: bool = False) -> str | None:
    """Commit ``paths`` (as they are in the working tree) on top of ``HEAD`` to ``branch``.

    A new ``branch`` is created at the commit; the current branch is moved only with
    ``allow_current_branch`` (and then the user's index is updated for ``paths`` alone, so that
    ``git status`` stays as it was for every other file). Any other existing branch is refused.
    Returns the new commit, or None when the tree would equal ``HEAD``'s (nothing to commit).
    """
    root = Path(root)
    head = resolve(root, "HEAD")
    if head is None:
        raise GitError(f"{root}: the repository has no commit yet: commit the pipeline first")
    on_current = branch == current_branch(root)
    if on_current and not allow_current_branch:
        raise GitError(f"refusing to commit on the current branch {branch!r} without allow_current_branch")
    if resolve(root, f"refs/heads/{branch}") is not None and not on_current:
        raise GitError(f"branch {branch!r} exists already: the flow never rewrites a branch")
    tree = tree_with(root, head, paths)
    if tree == tree_of(root, head):
        return None
    commit = git(root, "commit-tree", tree, "-p", head, "-m", message)
    # compare-and-swap: a branch that appeared (or moved) meanwhile is not overwritten
    git(root, "update-ref", "-m", "retrain: commit", f"refs/heads/{branch}", commit, head if on_current else ZERO)
    present = [p for p in paths if (root / p).exists()]
    if on_current and present:
        git(root, "reset", "--quiet", "--", *present)  # the index now matches the new HEAD for these paths
    return commit


def move_ref(root: Path | str, ref: str, commit: str, expected_old: str | None) -> None:
    """Point branch ``ref`` at ``commit`` if it is still at ``expected_old`` (None: must not exist yet)."""
    git(root, "update-ref", "-m", "retrain: accepted", f"refs/heads/{ref}", commit, expected_old or ZERO)


def changed_paths(root: Path | str, ignore: Sequence[str] = ()) -> list[str]:
    """Tracked files modified in the working tree or index, outside ``ignore`` (paths or folder prefixes)."""
    paths = git(root, "diff", "--name-only", "HEAD").splitlines()
    return [p for p in paths if not any(p == i or p.startswith(i.rstrip("/") + "/") for i in ignore)]
