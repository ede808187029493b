import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from fna.data import DataError
from fna.errors import FnaError
from fna.tasks import build_model, get_task
from fna.train import TrainConfig, fit
from fna.training import LossGuard, ResumableSampler, batches, make_scheduler, num_workers


class RandomSegmentation(Dataset):
    """A few noisy images, each with a bright rectangle that is class 1 (a few pixels ignored)."""

    def __init__(self, n: int = 6, size: int = 32) -> None:
        g = torch.Generator().manual_seed(1)
        self.images = 0.3 * torch.randn(n, 3, size, size, generator=g)
        self.masks = torch.zeros(n, size, size, dtype=torch.long)
        for i in range(n):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            self.masks[i, y:y + size // 2, x:x + size // 2] = 1
        self.images += 2.0 * self.masks[:, None]
        self.masks[:, :2] = 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.masks[i]


def collate(items):
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def _config(**kw) -> TrainConfig:
    return TrainConfig(**{"iters": 4, "batch_size": 2, "lr": 0.01, "checkpoint_every": 2, **kw})


def _lrs(cfg: TrainConfig, n: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, cfg, cfg.iters)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_poly_schedule_with_linear_warmup_multiplied_on():
    cfg = TrainConfig(lr=1.0, iters=100, warmup_iters=10, warmup_factor=0.1, schedule="poly", poly_power=0.9)
    lrs = _lrs(cfg, 60)
    for it in (0, 5, 9, 10, 50):  # the closed form: warm-up factor × (1 - it/iters)^power
        warm = 0.1 + 0.9 * it / 10 if it < 10 else 1.0
        assert lrs[it] == pytest.approx(warm * (1 - it / 100) ** 0.9, rel=1e-9)


def test_step_schedule_drops_at_milestone_fractions():
    cfg = TrainConfig(lr=1.0, iters=12, schedule="step", milestones=[8 / 12, 11 / 12], gamma=0.1)
    assert [round(v, 6) for v in _lrs(cfg, 12)] == [1.0] * 8 + [0.1] * 3 + [0.01]


def test_cosine_schedule_follows_the_half_cosine():
    cfg = TrainConfig(lr=1.0, iters=20, schedule="cosine")
    lrs = _lrs(cfg, 20)
    assert all(lrs[it] == pytest.approx(0.5 * (1 + math.cos(math.pi * it / 20)), abs=1e-9) for it in range(20))


def test_paper_recipe_scales_lr_with_batch():
    assert get_task("seg").recipe(8, 1000).lr == pytest.approx(0.005)
    assert get_task("ssdlite").recipe(64, 1000).optimizer == "rmsprop"


def test_sampler_shards_and_resumes_mid_epoch():
    full = ResumableSampler(10, seed=3).indices(0)
    a, b = ResumableSampler(10, 3, rank=0, world=2).indices(0), ResumableSampler(10, 3, rank=1, world=2).indices(0)
    assert sorted(a + b) == sorted(full) and len(a) == len(b) == 5
    s = ResumableSampler(10, seed=3)
    s.skip = 4
    assert list(s) == full[4:]


def test_batches_resume_at_the_same_batch():
    data = RandomSegmentation(6)
    straight = batches(data, collate, 2, seed=0)
    seen = [next(straight)[0] for _ in range(5)]
    resumed = batches(data, collate, 2, seed=0, start=3)
    assert torch.equal(next(resumed)[0], seen[3]) and torch.equal(next(resumed)[0], seen[4])


def test_fit_reduces_the_loss_of_a_tiny_segmenter(tiny_arch, tmp_path):
    losses: list[float] = []
    model = build_model("seg", tiny_arch, 2)
    fit(model, get_task("seg"), RandomSegmentation(), collate, _config(iters=40, lr=0.05, log_every=1), tmp_path,
        progress=lambda it, loss: losses.append(loss))
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_interrupted_and_resumed_fit_equals_uninterrupted(tiny_arch, tmp_path):
    task, data = get_task("seg"), RandomSegmentation()
    torch.manual_seed(0)
    straight = build_model("seg", tiny_arch, 2)
    fit(straight, task, data, collate, _config(iters=4), tmp_path / "a")
    torch.manual_seed(0)
    interrupted = build_model("seg", tiny_arch, 2)

    def interrupt(it: int, loss: float) -> None:
        if it == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, task, data, collate, _config(iters=4, log_every=1), tmp_path / "b", progress=interrupt)
    torch.manual_seed(123)  # a new process would start from a different state
    fresh = build_model("seg", tiny_arch, 2)
    fit(fresh, task, data, collate, _config(iters=4), tmp_path / "b", resume=True)
    for (k, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_compiled_fit_follows_the_eager_losses_and_writes_a_plain_checkpoint(tiny_arch, tmp_path, monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # dropout draws as in eager mode
    task, data = get_task("seg"), RandomSegmentation()
    losses: dict[bool, list[float]] = {False: [], True: []}
    for compiled in (False, True):
        torch.manual_seed(0)
        fit(build_model("seg", tiny_arch, 2), task, data, collate, _config(iters=3, log_every=1, compile=compiled),
            tmp_path / str(compiled), progress=lambda it, loss, c=compiled: losses[c].append(loss))
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    state = torch.load(tmp_path / "True" / "checkpoint.pt", weights_only=True)["model"]
    assert state.keys() == build_model("seg", tiny_arch, 2).state_dict().keys()  # no torch.compile prefix


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_arch, tmp_path):
    data = RandomSegmentation()
    model = build_model("seg", tiny_arch, 2)
    fit(model, get_task("seg"), data, collate, _config(iters=2), tmp_path)
    data.images[:] = math.nan
    with pytest.raises(FnaError, match=r"stopped at iteration 2: the loss is nan; the last checkpoint .*checkpoint.pt \(iteration 2\)"):
        fit(model, get_task("seg"), data, collate, _config(iters=4), tmp_path, resume=True)
    assert (tmp_path / "checkpoint.pt").exists()


def test_dataset_smaller_than_a_batch_is_a_clear_error(tiny_arch, tmp_path):
    with pytest.raises(FnaError, match="fewer than one batch"):
        fit(build_model("seg", tiny_arch, 2), get_task("seg"), RandomSegmentation(1), collate, _config(), tmp_path)


def test_loss_guard_stops_on_non_finite_and_diverging_losses_only():
    guard = LossGuard(factor=100, window=3)
    assert [guard.problem(v) for v in (2.0, 50.0, 0.01, 300.0)] == [None] * 4  # mean 100 ≤ 100 × 2
    assert "diverged" in guard.problem(600.0)  # mean of (0.01, 300, 600) > 200
    assert LossGuard().problem(float("nan")) == "is nan"
    resumed = LossGuard(factor=100, window=3)
    resumed.load_state_dict(guard.state_dict())  # keeps the first loss; the window refills
    assert resumed.first == 2.0 and [resumed.problem(600.0) for _ in range(2)] == [None, None]
    assert "diverged" in resumed.problem(600.0)


def test_finite_but_diverging_fine_tune_stops_with_a_clear_error(tiny_arch, tmp_path):
    # lr 1e4 with clipping: the loss climbs by orders of magnitude and never turns NaN
    with pytest.raises(FnaError, match="stopped at iteration .*: the loss diverged"):
        fit(build_model("seg", tiny_arch, 2), get_task("seg"), RandomSegmentation(), collate,
            _config(iters=30, lr=1e4, clip_grad=1.0, checkpoint_every=100), tmp_path)


def test_resume_after_a_divergence_continues_with_a_lower_lr_from_a_finite_checkpoint(tiny_arch, tmp_path):
    task, data = get_task("seg"), RandomSegmentation()
    fit(build_model("seg", tiny_arch, 2), task, data, collate, _config(iters=4), tmp_path)
    with pytest.raises(FnaError, match="stopped at iteration .* the last checkpoint .* holds finite weights"):
        fit(build_model("seg", tiny_arch, 2), task, data, collate, _config(iters=40, lr=1e3), tmp_path, resume=True)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    guard = state["guard"]  # states whose loss had run away were never checkpointed
    assert state["iter"] >= 4 and guard["recent"][-1] <= 100 * guard["first"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    resumed = build_model("seg", tiny_arch, 2)
    out = fit(resumed, task, data, collate, _config(iters=state["iter"] + 4, lr=1e-3), tmp_path, resume=True)
    assert math.isfinite(out["loss"]) and not any(not torch.isfinite(v).all() for v in resumed.state_dict().values()
                                                  if v.is_floating_point())
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert after["iter"] == state["iter"] + 4 and after["optimizer"]["param_groups"][0]["initial_lr"] == 1e-3


def test_one_image_per_process_where_batchnorm_needs_two_is_a_clear_error(tiny_arch, tmp_path):
    with pytest.raises(FnaError, match="batch_size 1 gives 1 image.* BatchNorm needs at least 2"):
        fit(build_model("seg", tiny_arch, 2), get_task("seg"), RandomSegmentation(), collate,
            _config(batch_size=1), tmp_path)


def _augmented_batches(root, workers: int, rng_seed: int = 5, start: int = 0, n: int = 4) -> list[torch.Tensor]:
    """``n`` batches of randomly scaled, cropped and flipped demo images, the global RNG seeded with
    ``rng_seed`` first and drawn between batches as a training step's dropout would."""
    from fna.data import open_segmentation, seg_collate, seg_train_transforms

    data = open_segmentation(root, "folder", "train", seg_train_transforms(crop=(32, 32)))
    torch.manual_seed(rng_seed)
    stream = batches(data, seg_collate, 2, seed=0, start=start, num_workers=workers)
    out = []
    for _ in range(n):
        images, masks = next(stream)
        out += [images, masks.float()]
        torch.rand(3)
    return out


def test_batches_and_their_augmentation_do_not_depend_on_the_number_of_workers(tmp_path):
    from fna.data.demo import write_demo

    write_demo(tmp_path, n_train=6, n_val=1, size=48, seed=0)
    alone, with_workers = _augmented_batches(tmp_path, 0), _augmented_batches(tmp_path, 2)
    assert all(torch.equal(a, b) for a, b in zip(alone, with_workers, strict=True))
    assert not torch.equal(alone[0], alone[2])  # real, changing batches


def test_augmentation_neither_depends_on_nor_draws_from_the_global_random_streams(tmp_path):
    import random

    from fna.data.demo import write_demo

    write_demo(tmp_path, n_train=6, n_val=1, size=48, seed=0)
    one, other = _augmented_batches(tmp_path, 0, rng_seed=1), _augmented_batches(tmp_path, 0, rng_seed=2)
    assert all(torch.equal(a, b) for a, b in zip(one, other, strict=True))
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = torch.rand(2), random.random(), np.random.random()
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    next(batches(SeededItemsProbe(), None, 2, seed=0))  # its transforms draw from all three streams
    assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1]
    assert np.random.random() == expected[2]


def test_draws_from_every_global_stream_are_the_same_in_a_worker_process():
    alone = next(batches(SeededItemsProbe(), None, 4, seed=0))
    assert torch.equal(alone, next(batches(SeededItemsProbe(), None, 4, seed=0, num_workers=1)))
    assert len(set(alone[:, 2].tolist())) == 4  # numpy's draws differ between samples too


def test_streams_of_one_seed_draw_different_augmentations_for_the_same_samples():
    first = next(batches(SeededItemsProbe(), None, 4, seed=0, shuffle=False))
    assert torch.equal(first, next(batches(SeededItemsProbe(), None, 4, seed=0, shuffle=False, stream=0)))
    other = next(batches(SeededItemsProbe(), None, 4, seed=0, shuffle=False, stream=1))
    assert not (first == other).any()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_that_breaks_during_training_stops_with_an_error_naming_it(tmp_path, workers):
    from fna.data import open_segmentation, seg_collate, seg_train_transforms
    from fna.data.demo import write_demo

    write_demo(tmp_path, n_train=4, n_val=1, size=48, seed=0)
    data = open_segmentation(tmp_path, "folder", "train", seg_train_transforms(crop=(32, 32)))
    broken = tmp_path / "images" / "train" / "train_00002.png"
    broken.write_bytes(b"not a png")  # after the run's checks, e.g. a disk or a sync tool at work
    stream = batches(data, seg_collate, 2, seed=0, num_workers=workers)
    with pytest.raises(DataError) as raised:
        next(stream), next(stream)  # one epoch: every image
    assert raised.value.path == str(broken) and "unreadable image" in raised.value.reason
    assert "Traceback" not in str(raised.value)


class BadLabel(DataError):
    """A DataError subclass, as a plugin's dataset might raise."""


class TwoArgumentError(FnaError):
    """An FnaError that pickle cannot rebuild (its __init__ takes other arguments than its args)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}: {b}")


def test_an_error_from_a_worker_arrives_as_its_own_class_or_at_least_with_its_message():
    import pickle

    from fna.training import FailedItem

    kept = pickle.loads(pickle.dumps(FailedItem(BadLabel("x.json", "label 9 >= 5 classes"))))
    assert type(kept.error) is BadLabel and str(kept.error) == "x.json: label 9 >= 5 classes"
    plain = pickle.loads(pickle.dumps(FailedItem(TwoArgumentError("y.png", "truncated"))))
    assert type(plain.error) is FnaError and str(plain.error) == "y.png: truncated"


class SeededItemsProbe(torch.utils.data.Dataset):
    """Samples that are pure draws from torch's, Python's and numpy's random streams."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        import random

        return torch.tensor([float(torch.rand(())), random.random(), np.random.random()], dtype=torch.float64)


def test_a_resumed_stream_repeats_the_augmented_batches_of_an_uninterrupted_one(tmp_path):
    from fna.data.demo import write_demo

    write_demo(tmp_path, n_train=6, n_val=1, size=48, seed=0)
    straight = _augmented_batches(tmp_path, 0, n=5)  # 3 batches per epoch: crosses into the second
    resumed = _augmented_batches(tmp_path, 0, start=2, n=3)
    assert all(torch.equal(a, b) for a, b in zip(straight[4:], resumed, strict=True))
    assert not torch.equal(straight[0], straight[6])  # epoch 2 draws other crops and orders


def test_every_epoch_augments_a_sample_anew():
    stream = batches(SeededItemsProbe(), None, 4, seed=0, shuffle=False)
    first, second = next(stream), next(stream)
    assert not torch.equal(first, second)
    assert torch.equal(first, next(batches(SeededItemsProbe(), None, 4, seed=0, shuffle=False)))


def test_auto_workers_follow_the_cpus_shared_by_processes_and_loaders(monkeypatch):
    monkeypatch.delenv("FNA_NUM_WORKERS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert num_workers("auto") == 7 and num_workers("auto", loaders=2) == 3 and num_workers(5) == 5
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert num_workers("auto") == 8  # capped
    monkeypatch.setenv("FNA_NUM_WORKERS", "0")
    assert num_workers("auto") == 0
    monkeypatch.setenv("FNA_NUM_WORKERS", "two")
    with pytest.raises(FnaError, match="FNA_NUM_WORKERS"):
        num_workers("auto")


@pytest.mark.parametrize("task,kwargs", [("retinanet", {"min_size": 512, "max_size": 1088}), ("ssdlite", {"size": 320})])
def test_anchors_stay_float32_under_bf16_autocast(task, kwargs):
    from torchvision.models.detection.image_list import ImageList

    from fna.arch import BUILTIN_ARCHS
    from fna.tasks import build_model

    generator = build_model(task, BUILTIN_ARCHS["mobilenet_v2"], 3, **kwargs).anchor_generator
    h, w = (512, 1088) if task == "retinanet" else (320, 320)
    images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
    strides = (8, 16, 32, 64, 128) if task == "retinanet" else (16, 32, 64, 128, 256, 512)
    maps = [torch.zeros(1, 8, -(-h // s), -(-w // s)) for s in strides]
    reference = generator(images, maps)[0]
    bf16 = generator(images, [m.bfloat16() for m in maps])[0]  # what autocast hands the generator
    assert reference.dtype == bf16.dtype == torch.float32 and torch.equal(reference, bf16)
    assert not torch.equal(reference, reference.bfloat16().float())  # in bf16 they would have been rounded
