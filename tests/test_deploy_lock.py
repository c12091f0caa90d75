"""deploy/lock.py's own logic: which platforms a target accepts, and what `# lock-omit:` leaves out."""
from __future__ import annotations

from .deploy_support import ROOT, lock


def test_a_glibc_accepts_every_older_manylinux_most_specific_first():
    tags = lock.manylinux_platforms("2.28")
    assert tags[0] == "manylinux_2_28_x86_64" and tags[10] == "manylinux_2_18_x86_64"
    assert tags.index("manylinux_2_17_x86_64") < tags.index("manylinux2014_x86_64") < tags.index(
        "manylinux1_x86_64")
    assert "manylinux_2_29_x86_64" not in tags


def item(name, requires=(), requested=False):
    return {"metadata": {"name": name, "version": "1", "requires_dist": list(requires)},
            "requested": requested, "download_info": {"archive_info": {"hashes": {"sha256": "0" * 64}}}}


def test_an_omitted_dependency_takes_what_only_it_needed_along():
    items = [item("tokenizers", ["huggingface-hub<2,>=0.16"], requested=True),
             item("huggingface_hub", ["httpx", "packaging"]), item("httpx"), item("packaging"),
             item("onnxruntime-gpu", ["packaging; python_version >= '3'"], requested=True)]
    kept = {i["metadata"]["name"] for i in lock.keep_reachable(items, {"huggingface-hub"})}
    assert kept == {"tokenizers", "onnxruntime-gpu", "packaging"}


def test_the_committed_locks_name_their_omissions():
    for cuda in ("13", "12"):  # each CUDA line's .in includes the shared requirements.in and its omissions
        assert lock.omitted_names(ROOT / f"functions/sdapi/requirements-cuda{cuda}.in") == {"huggingface-hub"}
        assert "huggingface" not in (ROOT / f"functions/sdapi/requirements-cuda{cuda}.txt").read_text().lower()
