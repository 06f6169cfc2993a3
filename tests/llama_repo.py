"""A local llama.cpp git repository made from the pinned source tree, for the tests of following releases (no
machine here reaches GitHub): tag ``b1`` is the pinned tree; ``b2`` adds a tiny architecture registration
(``SmolTestForCausalLM``, converted as a llama); a third commit ``b3`` (tagged by the test when it wants the release
to appear) makes the converter damage the token embeddings, so a build of it produces a broken file.

Only Python files differ, so the three trees have the native digest of the pinned build: every build of them reuses
the pinned programs, and nothing is compiled. The tree is committed with git's plumbing straight from the pinned
build's ``src/`` (no copy of its 177 MB), uncompressed (packing it for a fetch is then quick).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

TEST_ARCH = "SmolTestForCausalLM"
_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid", "GIT_CONFIG_NOSYSTEM": "1"}


@dataclasses.dataclass
class LlamaRepo:
    git_dir: Path
    commits: dict[str, str]  # b1, b2, b3 -> commit

    @property
    def url(self) -> str:
        return self.git_dir.as_uri()

    def git(self, *args: str, stdin: str | None = None, work_tree: Path | None = None) -> str:
        env = {**_ENV, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.git_dir),
               "GIT_DIR": str(self.git_dir)}
        if work_tree is not None:
            env["GIT_WORK_TREE"] = str(work_tree)
        return subprocess.run(["git", *args], env=env, input=stdin, check=True, capture_output=True, text=True,
                              cwd=work_tree or self.git_dir).stdout.strip()

    def tag(self, name: str) -> None:
        self.git("tag", "-f", name, self.commits[name])

    def _commit(self, parent: str, changes: dict[str, str], message: str) -> str:
        self.git("read-tree", parent)
        for path, text in changes.items():
            blob = self.git("hash-object", "-w", "--stdin", stdin=text)
            self.git("update-index", "--cacheinfo", f"100644,{blob},{path}")
        tree = self.git("write-tree")
        return self.git("commit-tree", tree, "-p", parent, "-m", message)


def make_llama_repo(src: Path, dest: Path) -> LlamaRepo:
    """The repository in ``dest`` (a git dir), from the pinned tree ``src``; tags b1 and b2 (b3: :meth:`tag`)."""
    dest.mkdir(parents=True)
    repo = LlamaRepo(dest, {})
    repo.git("init", "-q", "--bare", str(dest))
    repo.git("config", "core.compression", "0")
    repo.git("config", "core.loosecompression", "0")
    repo.git("config", "pack.compression", "0")
    repo.git("add", "-A", "-f", ".", work_tree=src)
    tree = repo.git("write-tree")
    b1 = repo.git("commit-tree", tree, "-m", "the pinned tree")
    init = (src / "conversion" / "__init__.py").read_text()
    llama = (src / "conversion" / "llama.py").read_text()
    anchor = '    "LlamaForCausalLM": "llama",\n'
    assert anchor in init and '    "LlamaForCausalLM",\n' in llama
    init2 = init.replace(anchor, anchor + f'    "{TEST_ARCH}": "llama",\n', 1)
    llama2 = llama.replace('    "LlamaForCausalLM",\n', f'    "LlamaForCausalLM",\n    "{TEST_ARCH}",\n', 1)
    b2 = repo._commit(b1, {"conversion/__init__.py": init2, "conversion/llama.py": llama2}, f"convert {TEST_ARCH}")
    hook = "    def modify_tensors(self, data_torch: Tensor, name: str, bid: int | None) -> Iterable[tuple[str, Tensor]]:\n"
    assert hook in llama2
    broken = llama2.replace(hook, hook + "        if name.endswith('embed_tokens.weight'):\n"
                                         "            data_torch = data_torch.flip(0)  # a bug: rows reversed\n", 1)
    b3 = repo._commit(b2, {"conversion/llama.py": broken}, "a converter bug that damages the embeddings")
    repo.git("update-ref", "refs/heads/master", b3)
    repo.commits.update(b1=b1, b2=b2, b3=b3)
    repo.tag("b1")
    repo.tag("b2")
    return repo
