"""forgetkern.replay.MSSR: the schedule on synthetic loss trajectories (expanding intervals, weakest first,
forgotten samples return), state round trips of the scheduler and the sampler, the per-sample loss helper,
mixed batches through a DataLoader, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from forgetkern.replay import MSSR, MSSRBatchSampler, MSSRDataset, per_sample_loss


def _simulate(mssr, steps, slots, loss_fn):
    """Run the schedule; loss_fn(i, c) is sample i's loss at its c-th rehearsal. Returns the steps at which
    each sample was rehearsed."""
    seen = {}
    for _ in range(steps):
        idx = mssr.select(slots)
        losses = []
        for i in idx.tolist():
            seen.setdefault(i, []).append(mssr.step)
            losses.append(loss_fn(i, len(seen[i])))
        mssr.update(idx, torch.tensor(losses))
        mssr.tick()
    return seen


def test_intervals_expand_as_memory_stabilises():
    mssr = MSSR(40, seed=0)
    # every rehearsal lowers the sample's loss: memory stabilises
    seen = _simulate(mssr, 400, 4, lambda i, c: 2.0 * 0.7 ** c)
    gaps = [torch.diff(torch.tensor(s)).double() for s in seen.values() if len(s) >= 5]
    assert len(gaps) >= 30
    early = torch.stack([g[:2].mean() for g in gaps]).mean()
    late = torch.stack([g[-2:].mean() for g in gaps]).mean()
    assert late > 1.5 * early, (float(early), float(late))
    # and the strengths grew geometrically with the rehearsals
    assert bool((mssr.strength[mssr.count >= 5] > mssr.init_strength * 4).all())


def test_hard_samples_are_rehearsed_more_and_forgotten_ones_come_back():
    mssr = MSSR(30, seed=1)
    hard = set(range(5))
    seen = _simulate(mssr, 300, 3, lambda i, c: 6.0 if i in hard else 1.5 * 0.7 ** c)
    n_hard = sum(len(seen.get(i, [])) for i in hard) / len(hard)
    n_easy = sum(len(seen.get(i, [])) for i in range(5, 30)) / 25
    assert n_hard > 2 * n_easy, (n_hard, n_easy)
    # a failed rehearsal (loss far above the running mean) shrinks the strength
    s0 = mssr.strength[10].item()
    mssr.update([10], [50.0])
    assert mssr.strength[10].item() == max(mssr.min_strength, s0 * mssr.shrink)


def test_weakest_first_and_never_seen_first():
    mssr = MSSR(10, seed=3)
    first = mssr.select(10)
    assert sorted(first.tolist()) == list(range(10))  # all unseen: a seeded random order
    assert first.tolist() == MSSR(10, seed=3).select(10).tolist()
    assert first.tolist() != MSSR(10, seed=4).select(10).tolist()
    mssr.update(first, torch.linspace(0.1, 3.0, 10))
    mssr.tick(7)
    r = mssr.retention()
    pick = mssr.select(3)
    assert set(pick.tolist()) == set(torch.argsort(r)[:3].tolist())
    assert bool((r[pick].max() <= r[[i for i in range(10) if i not in pick.tolist()]].min()))
    # retention follows exp(-age / S)
    i = int(first[0])
    assert math.isclose(float(mssr.retention()[i]), math.exp(-7 / float(mssr.strength[i])), rel_tol=1e-12)
    assert float(mssr.retention()[pick[0]]) == 1.0  # just rehearsed


def test_state_round_trip_scheduler_and_sampler():
    def loss(i, c):
        return 1.0 + 0.5 * math.sin(i + c)

    a = MSSR(25, seed=2)
    _simulate(a, 20, 3, loss)
    state = a.state_dict()
    b = MSSR(25, seed=2)
    b.load_state_dict(state)
    ra, rb = _simulate(a, 20, 3, loss), _simulate(b, 20, 3, loss)
    assert ra == rb
    assert torch.equal(a.strength, b.strength) and a.step == b.step
    with pytest.raises(ValueError, match="n_memory=25"):
        MSSR(26, seed=2).load_state_dict(state)

    def batches(sampler, n):
        out = []
        it = iter(sampler)
        while len(out) < n:
            try:
                out.append(next(it))
            except StopIteration:
                it = iter(sampler)
        return out

    s1 = MSSRBatchSampler(30, MSSR(12, replay_ratio=0.25), 8, seed=5)
    full = batches(s1, 9)   # crosses an epoch boundary (30 / 6 = 5 batches per epoch)
    s2 = MSSRBatchSampler(30, MSSR(12, replay_ratio=0.25), 8, seed=5)
    head = batches(s2, 4)
    st = s2.state_dict()
    s3 = MSSRBatchSampler(30, MSSR(12, replay_ratio=0.25), 8, seed=5)
    s3.load_state_dict(st)
    rest = batches(s3, 5)
    assert head + rest == full


@pytest.mark.parametrize("fill", ["weakest", "domain"])
def test_sampler_mixed_batches_through_a_dataloader(fill):
    domain = [{"x": torch.tensor([i])} for i in range(24)]
    general = [{"x": torch.tensor([100 + i])} for i in range(7)]
    mssr = MSSR(len(general), replay_ratio=0.25, fill=fill, seed=0)
    ds = MSSRDataset(domain, general)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=MSSRBatchSampler(len(domain), mssr, batch_size=8))
    seen_dom, seen_rep, n_batches = [], [], 0
    for batch in loader:
        n_batches += 1
        r = batch["replay_index"]
        n_rep = int((r >= 0).sum())
        assert (n_rep == 2) if fill == "weakest" else (n_rep <= 2)
        assert batch["x"].shape == (8, 1) or n_batches == len(loader) or fill == "domain"
        m = r >= 0
        assert torch.equal(batch["x"][m, 0], 100 + r[m])
        seen_dom += batch["x"][~m, 0].tolist()
        seen_rep += r[m].tolist()
        mssr.update(r[m], torch.full((int(m.sum()),), 1.0))
    assert sorted(seen_dom) == list(range(24))       # each domain sample once per epoch
    assert len(set(seen_rep)) == 7                   # unseen memory samples come first
    assert mssr.step == n_batches <= len(loader) == 4
    if fill == "domain":
        assert n_batches == 4 and len(seen_rep) == 7  # all 7 due once (strength 4+: not due again yet)
    t = MSSRDataset([torch.zeros(2)], [torch.ones(2)])
    assert t[1][1] == 0 and t[0][1] == -1


def test_per_sample_loss_masks_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, 3:] = -100
    labels[2, :] = -100
    got = per_sample_loss(logits, labels)
    for b in range(2):
        lab = labels[b, 1:]
        m = lab != -100
        want = torch.nn.functional.cross_entropy(logits[b, :-1][m], lab[m])
        assert torch.allclose(got[b], want, atol=1e-6)
    assert torch.isnan(got[2])
    mssr = MSSR(3)
    s = mssr.strength.clone()
    mssr.update([0, 1, 2], got)
    assert mssr.strength[2] == s[2] and mssr.strength[0] != s[0]  # NaN skipped
    with pytest.raises(ValueError, match="logits must be"):
        per_sample_loss(logits[0], labels)


def test_bad_args():
    with pytest.raises(ValueError, match="n_memory must be a positive int"):
        MSSR(0)
    with pytest.raises(ValueError, match="replay_ratio must be a float in"):
        MSSR(5, replay_ratio=1.0)
    with pytest.raises(ValueError, match="growth must be"):
        MSSR(5, growth=-1.0)
    with pytest.raises(ValueError, match="shrink must be in"):
        MSSR(5, shrink=2.0)
    with pytest.raises(TypeError, match="seed must be an int"):
        MSSR(5, seed="a")
    m = MSSR(5)
    with pytest.raises(ValueError, match="2 indices but 1 losses"):
        m.update([0, 1], [1.0])
    with pytest.raises(IndexError, match=r"indices must be in \[0, 5\)"):
        m.update([7], [1.0])
    with pytest.raises(ValueError, match="losses must be >= 0"):
        m.update([1], [-1.0])
    with pytest.raises(ValueError, match="k must be an int"):
        m.select(-1)
    with pytest.raises(ValueError, match="leaves no domain slot"):
        MSSRBatchSampler(10, MSSR(5, replay_ratio=0.9), 1)
    with pytest.raises(TypeError, match="mssr must be an MSSR"):
        MSSRBatchSampler(10, object(), 4)
