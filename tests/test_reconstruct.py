"""Block reconstruction: the mask is frozen, the block's output moves toward the dense block's, and
held-out windows keep the solver's weights when tuning does not help."""

from __future__ import annotations

import pytest
import torch

import ptp
from ptp import engine
from ptp.config import ConfigError
from ptp.reconstruct import minibatches
from tests.lm_dirs import one_thread  # noqa: F401 (fixture)
from tests.tiny import tiny_model, tokens

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = tokens(12, 16)


def config(**kw):
    base = dict(method="sparsegpt", sparsity="2:4", batch_size=4, reconstruct=True, recon_lr=1e-3, recon_epochs=3,
                recon_batch=2, recon_holdout=2)
    return ptp.PruneConfig(**{**base, **kw})


def test_minibatches_hold_out_the_last_windows_and_never_straddle_batches():
    train, held = minibatches(10, 4, 3, 3)
    assert train == [(0, slice(0, 3)), (0, slice(3, 4)), (1, slice(0, 3))]
    assert held == [(1, slice(3, 4)), (2, slice(0, 2))]  # samples 7, 8, 9


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_tuning_lowers_the_block_error_and_keeps_the_mask(family, monkeypatch):
    seen = []
    original = engine.tune_block

    def spy(index, block, weights, *args, **kwargs):
        before = [(w.detach().clone(), mask.clone()) for w, mask in weights]
        result = original(index, block, weights, *args, **kwargs)
        seen.append((before, [w.detach().clone() for w, _ in weights], result))
        return result

    monkeypatch.setattr(engine, "tune_block", spy)
    model = tiny_model(family)
    report = ptp.prune(model, tokens(32, 32), config(recon_holdout=4, recon_lr=3e-4))
    assert len(seen) == len(report.reconstruction) == model.config.num_hidden_layers
    # Random tiny models overfit some blocks' 28 training windows: the guard then keeps the solver's.
    assert any(result.kept == "tuned" for _, _, result in seen)
    for before, after, result in seen:
        assert result.train_after < result.train_before
        assert (result.kept == "tuned") == (result.heldout_after < result.heldout_before)
        for (w0, mask), w1 in zip(before, after):
            assert torch.equal(mask, w0 != 0)
            assert torch.equal(w1 != 0, mask), "a pruned weight moved, or a kept one became 0"
            assert torch.equal(w0, w1) == (result.kept == "solver")
    for layer in report.layers:  # every N:M group valid after tuning
        ptp.io.check_sparsity(layer.name, ptp.units.find_unit(model, layer.name).matrix(), ptp.config.parse_sparsity("2:4"))


def test_zero_epochs_equal_the_plain_solver_bit_for_bit():
    plain, tuned = tiny_model("llama"), tiny_model("llama")
    ptp.prune(plain, CALIB, config(reconstruct=False))
    ptp.prune(tuned, CALIB, config(recon_epochs=0))
    for key, tensor in plain.state_dict().items():
        assert torch.equal(tuned.state_dict()[key], tensor), key


def test_reconstruction_is_deterministic():
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    ptp.prune(a, CALIB, config())
    ptp.prune(b, CALIB, config())
    for key, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], tensor), key


def test_the_guard_keeps_the_solver_weights_when_tuning_hurts_the_held_out_windows(monkeypatch):
    """A learning rate far too large wrecks the block: the held-out error rises, so every block
    keeps exactly the weights the solver gave it."""
    kept = {}
    original = engine.tune_block

    def spy(index, block, weights, *args, **kwargs):
        before = [w.detach().clone() for w, _ in weights]
        result = original(index, block, weights, *args, **kwargs)
        kept[index] = (result, all(torch.equal(w, b) for (w, _), b in zip(weights, before)))
        return result

    monkeypatch.setattr(engine, "tune_block", spy)
    ptp.prune(tiny_model("llama"), CALIB, config(recon_lr=10.0))
    for result, unchanged in kept.values():
        assert result.kept == "solver" and result.heldout_after > result.heldout_before
        assert unchanged


def test_norms_are_tuned_only_when_asked():
    model = tiny_model("llama")
    norms = {k: v.clone() for k, v in model.state_dict().items() if "norm" in k}
    ptp.prune(model, CALIB, config())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in norms.items())
    ptp.prune(model := tiny_model("llama"), CALIB, config(recon_norms=True))
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in norms.items() if "layers" in k)


def test_bad_reconstruction_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="true_sequential"):
        config(true_sequential=True)
    with pytest.raises(ConfigError, match="recon_lr > 0"):
        config(recon_lr=0)
    with pytest.raises(ConfigError, match="holds out 4 calibration windows"):
        ptp.prune(tiny_model("llama"), CALIB[:4], config(recon_holdout=4))


def test_several_processes_are_refused_before_any_work(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="runs in one process.*drop --nproc"):
        ptp.prune(model, CALIB, config())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_cli_reconstruct_records_each_block_in_ptp_json(tmp_path, capsys):
    import json

    from ptp.cli import main
    from tests.lm_dirs import tiny_model as tiny_lm, tiny_tokenizer, write_text

    tok = tiny_tokenizer()
    src = tmp_path / "model"
    tiny_lm(tok).save_pretrained(src)
    tok.save_pretrained(src)
    text = write_text(tmp_path / "calib.txt")
    out = tmp_path / "out"
    assert main(["prune", str(src), "--sparsity", "0.5", "--calib", str(text), "--nsamples", "8", "--seqlen", "16",
                 "--reconstruct", "--recon-epochs", "2", "--recon-holdout", "2", "--out", str(out), "-q"]) == 0
    record = json.loads((out / "ptp.json").read_text())
    assert len(record["report"]["reconstruction"]) == 2
    assert record["config"]["reconstruct"] is True
    assert main(["report", str(out)]) == 0
    assert "held-out error, solver" in capsys.readouterr().out


# --------------------------------------------------------------------------- structured pruning, same loop


def _logit_error(dense, model, ids) -> float:
    with torch.no_grad():
        a, b = dense(ids).logits, model(ids).logits
    return float((a - b).pow(2).sum() / a.pow(2).sum())


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_structured_reconstruction_tunes_the_cut_blocks_towards_dense(family):
    calib, held_out = tokens(32, 32), tokens(8, 32, seed=9)
    dense, plain, tuned = tiny_model(family), tiny_model(family), tiny_model(family)
    ptp.prune_structured(plain, calib, 0.35, batch_size=4)
    report = ptp.prune_structured(tuned, calib, 0.35, batch_size=4, tuning=config(recon_lr=1e-4, recon_holdout=4))
    assert plain.config.to_dict() == tuned.config.to_dict()  # the same cut, the same smaller config
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in tuned.state_dict().items()}
    assert [t["block"] for t in report.reconstruction] == list(range(tuned.config.num_hidden_layers))
    assert any(t["kept"] == "tuned" for t in report.reconstruction)
    for t in report.reconstruction:
        assert (t["kept"] == "tuned") == (t["heldout_after"] < t["heldout_before"])
    assert report.to_dict()["reconstruction"] == report.reconstruction
    assert _logit_error(dense, tuned, held_out) < _logit_error(dense, plain, held_out)


def test_structured_zero_epochs_and_no_tuning_are_the_plain_cut_bit_for_bit():
    calib = tokens(16, 32)
    plain, zero = tiny_model("llama"), tiny_model("llama")
    ptp.prune_structured(plain, calib, 0.35, batch_size=4)
    report = ptp.prune_structured(zero, calib, 0.35, batch_size=4, tuning=config(recon_epochs=0))
    assert report.reconstruction == []
    for key, tensor in plain.state_dict().items():
        assert torch.equal(zero.state_dict()[key], tensor), key


def test_cli_structured_reconstruct_is_recorded_and_reported(tmp_path, capsys):
    import json

    from ptp.cli import main
    from tests.lm_dirs import save_model_dir, write_text

    src, out = save_model_dir(tmp_path / "m"), tmp_path / "out"
    assert main(["prune", str(src), "--method", "structured", "--ratio", "0.35", "--calib",
                 str(write_text(tmp_path / "calib.txt")), "--nsamples", "8", "--seqlen", "16", "--reconstruct",
                 "--recon-epochs", "2", "--recon-holdout", "2", "--out", str(out), "-q"]) == 0
    record = json.loads((out / "ptp.json").read_text())
    assert len(record["structured"]["reconstruction"]) == 2 and record["arguments"]["reconstruct"] is True
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out error, solver" in text and "| block | attention output error | MLP output error |" in text
    assert text.count("\n| 1 |") == 2  # block 1 in both tables
    assert main(["report", str(out), "--plot"]) == 2  # no per-layer sparsity to draw: one line, exit 2


def test_cli_refuses_reconstruct_with_several_processes_before_launching(tmp_path, capsys):
    from ptp.cli import main
    from tests.lm_dirs import save_model_dir, write_text

    src, out = save_model_dir(tmp_path / "m"), tmp_path / "out"
    assert main(["prune", str(src), "--sparsity", "0.5", "--calib", str(write_text(tmp_path / "calib.txt")),
                 "--reconstruct", "--nproc", "2", "--out", str(out), "-q"]) == 2
    assert "--reconstruct runs in one process" in capsys.readouterr().err and not out.exists()
