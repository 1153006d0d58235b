"""``owner/name@revision`` names one revision of a hub model everywhere a checkpoint spec is taken
(``sinklm compare``, ``stream-ppl``, ``zeroshot``, ``convert``), parsed once in
``pretrain.checkpoints.resolve``. The hub is a hand-made Hugging Face cache (``models--owner--name/
refs/<revision>`` -> ``snapshots/<commit>/``) holding two revisions with different weights, read
with ``HF_HUB_OFFLINE=1``: no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ckpt_testing import REPO
from hub_cache_testing import build_hub_cache, use_hub_cache

from pretrain.checkpoints import read_checkpoint
from pretrain.checkpoints.errors import CheckpointError
from pretrain.checkpoints.resolve import resolve, split_revision

HUB = "test-owner/tiny-neox"
COMMITS = {"step1": "a" * 40, "step2": "b" * 40}


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """An HF cache with revisions step1 and step2 of HUB (tiny GPT-NeoX, different weights)."""
    return build_hub_cache(tmp_path_factory.mktemp("hf_cache"), HUB, COMMITS)


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    return use_hub_cache(monkeypatch, hub_cache)


def test_split_revision_rule(tmp_path, monkeypatch):
    """Prevents '@' being read as a revision where it is not one: a local path containing '@' stays
    a path; a hub name's '@rev' splits; an empty or contradicting revision is an error."""
    assert split_revision("EleutherAI/pythia-160m-deduped@step143000") == ("EleutherAI/pythia-160m-deduped", "step143000")
    assert split_revision("EleutherAI/pythia-160m-deduped", "step1") == ("EleutherAI/pythia-160m-deduped", "step1")
    assert split_revision("EleutherAI/pythia-160m@step1", "step1") == ("EleutherAI/pythia-160m", "step1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "v@2").mkdir(parents=True)
    assert split_revision("runs/v@2") == ("runs/v@2", None)
    assert split_revision("runs/missing@2") == ("runs/missing@2", None)  # under a local folder: not a hub name
    with pytest.raises(CheckpointError, match="expected a revision after '@'"):
        split_revision("EleutherAI/pythia-160m@")
    with pytest.raises(CheckpointError, match="'step1' in the name contradicts --revision 'step2'"):
        split_revision("EleutherAI/pythia-160m@step1", "step2")


def test_revision_picks_that_snapshot(offline_hub):
    """Prevents the main branch (or another step) standing in for the revision asked for: each
    ``@revision`` reads its own snapshot's weights, the same as ``revision=``, in every consumer."""
    from inference.backends import load_backend
    from inference.zeroshot import resolve_model

    first, second = (read_checkpoint(f"{HUB}@{rev}") for rev in COMMITS)
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(first.state[key], second.state[key])
    assert torch.equal(read_checkpoint(HUB, revision="step2").state[key], second.state[key])
    resolved = resolve(f"{HUB}@step1")
    assert (resolved.hub_name, resolved.revision, resolved.path.name) == (HUB, "step1", COMMITS["step1"])
    backend = load_backend(f"{HUB}@step2")
    assert torch.equal(backend.model.state_dict()[key], second.state[key].to(backend.model.state_dict()[key].dtype))
    source = resolve_model(f"{HUB}@step1")
    assert (source.location, source.revision) == (HUB, "step1")
    # lm-eval's model (zeroshot) loads that revision too, not main
    from safetensors.torch import load_file

    from inference.zeroshot import build_lm

    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    for revision, commit in COMMITS.items():
        lm = build_lm(resolve_model(f"{HUB}@{revision}"), device="cpu", batch_size=1)
        snapshot = offline_hub / f"models--{HUB.replace('/', '--')}" / "snapshots" / commit
        assert torch.equal(lm.model.state_dict()[name], load_file(snapshot / "model.safetensors")[name]), revision


def test_unknown_revision_offline_is_one_line(offline_hub, tmp_path, capsys):
    """Prevents a hub traceback (or a silent fallback to main) for a revision not available: the
    error names the model and the revision, in the library and through each CLI (in process)."""
    from sinklm.cli import main

    with pytest.raises(CheckpointError, match=f"checkpoint {HUB} at revision step3: not a local folder"):
        resolve(f"{HUB}@step3")
    text = tmp_path / "stream.txt"
    text.write_text((REPO / "data" / "corpora" / "README.md").read_text())
    commands = (
        ["stream-ppl", f"{HUB}@step3", "--text", str(text)],
        ["compare", f"vanilla={HUB}@step3", "--text", str(text), "--output-dir", str(tmp_path / "compare")],
        ["zeroshot", f"{HUB}@step3", "--out", str(tmp_path / "zeroshot")],
    )
    for argv in commands:
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"{HUB} at revision step3" in lines[0], (argv, lines)
    assert not (tmp_path / "compare").exists() and not (tmp_path / "zeroshot").exists()
