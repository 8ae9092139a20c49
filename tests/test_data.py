"""forgetkern.data: windows, replay mixing (every container kind), layer freezing."""

import pytest
import torch

from forgetkern.data import batch_from_windows, batches, freeze_layers, mix_replay, text_windows
from forgetkern.testing.models import tiny_gpt2, tiny_llama
from tests._text_helpers import ByteTokenizer


def test_text_windows_cut_bos_and_padding():
    tok = ByteTokenizer()
    w = text_windows(tok, ["abcdefghij", "xy"], length=5)
    ids = tok("abcdefghij")["input_ids"]
    assert w.tolist()[:2] == [[1] + ids[0:4], [1] + ids[4:8]]  # BOS + 4 tokens each, the tail dropped
    assert w.tolist()[2] == [1] + tok("xy")["input_ids"] + [-1, -1]
    w2 = text_windows(tok, ["abcdefghij"], length=5, stride=2, add_bos=False)
    assert w2.tolist() == [ids[s:s + 5] for s in (0, 2, 4)]
    assert text_windows(tok, ["abcdefghij"] * 5, length=4, max_windows=3).shape == (3, 4)
    b = batch_from_windows(w[2:3], pad_token_id=0)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0]] and b["labels"][0, 3:].tolist() == [-100, -100]
    assert b["input_ids"][0, 3:].tolist() == [0, 0]
    with pytest.raises(TypeError, match="one str"):
        text_windows(tok, "abc", length=4)
    with pytest.raises(ValueError, match="length"):
        text_windows(tok, ["abc"], length=1)


def test_batches_cover_every_window_once():
    w = torch.arange(20).view(10, 2)
    seen = torch.cat([b["input_ids"] for b in batches(w, 3, shuffle=True, seed=1)])
    assert sorted(seen[:, 0].tolist()) == w[:, 0].tolist()


@pytest.mark.parametrize("kind", ["list", "tensor", "torch", "hf"])
def test_mix_replay_ratio_and_kinds(kind):
    dom, gen = list(range(80)), list(range(1000, 1030))
    if kind == "tensor":
        dom, gen = torch.tensor(dom)[:, None], torch.tensor(gen)[:, None]
    elif kind == "torch":
        dom, gen = torch.utils.data.TensorDataset(torch.tensor(dom)), torch.utils.data.TensorDataset(torch.tensor(gen))
    elif kind == "hf":
        datasets = pytest.importorskip("datasets")
        dom, gen = datasets.Dataset.from_dict({"x": dom}), datasets.Dataset.from_dict({"x": gen})
    mixed = mix_replay(dom, gen, ratio=0.2, seed=0)
    assert len(mixed) == 100
    vals = [int(mixed[i]["x"] if kind == "hf" else (mixed[i][0] if kind != "list" else mixed[i]))
            for i in range(len(mixed))]
    assert sum(v >= 1000 for v in vals) == 20 and sorted(v for v in vals if v < 1000) == list(range(80))
    assert len(set(v for v in vals if v >= 1000)) == 20  # without replacement while the pool lasts
    if kind == "list":
        assert mix_replay(dom, gen, ratio=0.2, seed=0) == mixed and mix_replay(dom, gen, ratio=0.2, seed=1) != mixed


def test_mix_replay_errors():
    with pytest.raises(ValueError, match=r"ratio must be a float in \[0, 1\)"):
        mix_replay([1], [2], ratio=1.0)
    with pytest.raises(ValueError, match="general is empty"):
        mix_replay([1, 2, 3], [], ratio=0.5)
    with pytest.raises(TypeError, match="must have a length"):
        mix_replay(iter([1]), [2])
    assert mix_replay([1, 2], [], ratio=0.0) in ([1, 2], [2, 1])


def test_freeze_layers_bottom_half_llama_peft_and_gpt2():
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(tiny_llama(layers=4), LoraConfig(r=2, target_modules=["q_proj"]))
    names = freeze_layers(m, 0.5)
    assert names and all(".layers.0." in n or ".layers.1." in n for n in names)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.2." in n or ".layers.3." in n for n in trainable)
    g = tiny_gpt2(layers=2)
    names = freeze_layers(g, 0.5)
    assert any(".h.0." in n for n in names) and not any(".h.1." in n for n in names)
    assert "transformer.wte.weight" in names
    with pytest.raises(ValueError, match="fraction"):
        freeze_layers(g, 1.5)
