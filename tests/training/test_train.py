import copy
import dataclasses
import json
import random

import pytest
import torch
import torch.nn.functional as F

from casm_deploy.config import TrainConfig
from casm_deploy.models.mapping import build_masker
from casm_deploy.training.casm import CASM, StepSettings, mapping_loss
from casm_deploy.training.pool import ThinningPool

# The settings of one step for the presets the tests use (config.PRESETS; the rest, train's
# defaults: StepSettings() is a default run's, L100's).
STEP_F = StepSettings(fixed_classifier=True, hp=0.0, smf=None)
STEP_L = StepSettings(hp=0.0, smf=None)
STEP_L100 = StepSettings()


def tiny_masker(num_classes=3):
    torch.manual_seed(0)
    return build_masker("resnet18", num_classes, width=8)


def batch(n=6, size=32, num_classes=3):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(n, 3, size, size, generator=generator)
    labels = torch.arange(n) % num_classes
    return images, labels


# The thinning pool ---------------------------------------------------------------------------


def stored_steps(pool, steps):
    model, stored = torch.nn.Linear(2, 2), []
    for step in range(steps):
        if pool.should_store(step):
            pool.store(model)
            stored.append(step)
    return stored


def test_pool_stores_first_step_then_every_smf_steps():
    pool = ThinningPool(capacity=30, smf=100, hp=0.5, rng=random.Random(0))
    # As the reference's `i % smf == smf - 1`, plus the first step (empty pool).
    assert stored_steps(pool, 1000) == [0] + list(range(99, 1000, 100))


def test_pool_without_period_keeps_only_the_first_snapshot():
    pool = ThinningPool(capacity=30, smf=None, hp=0.5, rng=random.Random(0))
    assert stored_steps(pool, 500) == [0]


def test_pool_is_unused_when_hp_is_zero():
    assert stored_steps(ThinningPool(30, 100, hp=0.0, rng=random.Random(0)), 500) == []


def test_pool_capacity_and_random_replacement():
    pool = ThinningPool(capacity=30, smf=1, hp=0.5, rng=random.Random(0))
    model = torch.nn.Linear(1, 1, bias=False)
    for value in range(100):
        model.weight.data.fill_(value)
        pool.store(model)
    values = sorted(int(s["weight"].item()) for s in pool.snapshots)
    assert len(pool.snapshots) == 30
    assert values[-1] >= 90 and values[0] < 29  # new ones replace random old slots
    assert len(set(values)) == 30
    assert all(
        s["weight"].dtype == torch.float32 and s["weight"].device.type == "cpu"
        for s in pool.snapshots
    )


def test_pool_snapshot_is_a_copy():
    pool = ThinningPool(capacity=2, smf=1, hp=1.0, rng=random.Random(0))
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(1.0)
    pool.store(model)
    model.weight.data.fill_(2.0)
    assert pool.snapshots[0]["weight"].item() == 1.0


@pytest.mark.parametrize("hp", [0.0, 0.3, 0.5, 1.0])
def test_pool_draw_frequency(hp):
    pool = ThinningPool(capacity=30, smf=1, hp=hp, rng=random.Random(1))
    for _ in range(5):
        pool.store(torch.nn.Linear(1, 1))
    draws = [pool.draw() for _ in range(4000)]
    from_pool = [d for d in draws if d is not None]
    assert abs(len(from_pool) / len(draws) - hp) < 0.03
    if hp > 0:
        assert set(from_pool) == set(range(5))


def test_empty_pool_draws_the_current_classifier():
    assert ThinningPool(30, 100, hp=1.0, rng=random.Random(0)).draw() is None


# The mapping loss ----------------------------------------------------------------------------


def fixed_case():
    # 4 images, 3 classes. Clean: right on 0, 1, 2; wrong on 3. Masked: wrong on 0, right on 1,
    # wrong on 2 and 3. So c = [1, 1, 1, 0] and n = [1, 0, 1, 0].
    labels = torch.tensor([0, 1, 2, 0])
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [0, 3.0, 0]])
    masked = torch.tensor([[0.0, 1, 0], [0, 2.0, 1], [1.0, 0, 0], [0, 0, 1.0]])
    areas = torch.tensor([0.25, 0.5, 1.0, 0.1])
    masks = areas.view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()
    return logits, masked, labels, masks


def neg_entropy(row):
    p = [torch.exp(v) / sum(torch.exp(u) for u in row) for v in row]
    return sum(float(q) * float(torch.log(q)) for q in p)


def test_mapping_loss_entropy_by_hand():
    logits, masked, labels, masks = fixed_case()
    lam = 10.0
    score = (neg_entropy(masked[0]) + neg_entropy(masked[1]) + neg_entropy(masked[2]) + 0) / 4
    area = -lam * (max(1 - 0.25, 0) + 0 + max(1 - 1.0, 0) + 0) / 4  # only n_i = 1 images
    loss = mapping_loss(logits, masked, labels, masks, lam, "entropy")
    assert loss.item() == pytest.approx(score + area, abs=1e-6)


def test_mapping_loss_classification_by_hand():
    logits, masked, labels, masks = fixed_case()
    lam = 4.0
    ce = [-float(torch.log_softmax(masked[i], 0)[labels[i]]) for i in range(4)]
    expected = -sum(ce) / 4 - lam * 0.75 / 4
    loss = mapping_loss(logits, masked, labels, masks, lam, "classification")
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_area_term_ignores_images_that_were_not_fooled():
    logits, masked, labels, masks = fixed_case()
    smaller = masks.clone()
    smaller[1] = 0.0  # image 1 is not fooled (n = 0): its area must not matter
    smaller[3] = 0.0  # image 3 was wrong on the clean image (n = 0)
    a = mapping_loss(logits, masked, labels, masks, 10.0)
    b = mapping_loss(logits, masked, labels, smaller, 10.0)
    assert a.item() == pytest.approx(b.item())


def test_mapping_gives_the_encoder_no_gradient_through_the_features():
    masker = tiny_masker()
    images, _ = batch()
    masks, _ = masker(images)
    grads = torch.autograd.grad(masks.mean(), list(masker.encoder.parameters()), allow_unused=True)
    assert all(g is None for g in grads)


# One CASM step --------------------------------------------------------------------------------


def test_a_runs_step_settings_are_its_config_with_the_preset_resolved():
    from casm_deploy.training.train import step_settings

    assert step_settings(TrainConfig()) == STEP_L100  # StepSettings' defaults are train's
    assert step_settings(TrainConfig(reproduce="F")) == STEP_F
    assert step_settings(TrainConfig(reproduce="L")) == STEP_L
    paper = TrainConfig(reproduce="FL", score="classification", lambda_r=None, hp=0.3)
    assert step_settings(paper) == StepSettings(
        hp=0.3, smf=None, score="classification", lambda_r=11
    )
    given = TrainConfig(
        lr=0.5, momentum=0.5, weight_decay=0.5, lr_decoder=0.5, lr_decay_every=5, grad_clip=5.0,
        smf=5, pool_size=5, pool_device="pinned", fill="mean", lambda_r=5.0, amp="bf16",
    )  # fmt: skip
    assert step_settings(given) == StepSettings(
        lr=0.5, momentum=0.5, weight_decay=0.5, lr_decoder=0.5, lr_decay_every=5, grad_clip=5.0,
        smf=5, pool_size=5, pool_device="pinned", fill="mean", lambda_r=5.0, amp="bf16",
    )  # fmt: skip


def test_fixed_classifier_never_changes():
    masker = tiny_masker()
    before = copy.deepcopy(masker.encoder.state_dict())
    casm = CASM(masker, STEP_F, random.Random(0))
    decoder_before = copy.deepcopy(masker.decoder.state_dict())
    images, labels = batch()
    for _ in range(3):
        casm.step(images, labels)
    after = masker.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert not casm.pool.snapshots
    assert any(
        not torch.equal(decoder_before[k], v) for k, v in masker.decoder.state_dict().items()
    )


def test_trained_classifier_moves_only_by_the_classifier_losses():
    """The encoder's update is one SGD step on CE(clean), then one on CE(masked-out): Eq. 8."""
    settings = dataclasses.replace(STEP_L, lr=0.05)
    masker = tiny_masker()
    twin = copy.deepcopy(masker)
    images, labels = batch()
    CASM(masker, settings, random.Random(0)).step(images, labels)

    # The same step by hand, with no mapping loss at all.
    twin.train()
    sgd = torch.optim.SGD(
        twin.encoder.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    logits, features = twin.encoder(twin.normalize(images))
    sgd.zero_grad()
    F.cross_entropy(logits, labels).backward()
    sgd.step()
    with torch.no_grad():
        masks = twin.decoder([f.detach() for f in features], size=images.shape[-2:])
    masked_logits, _ = twin.encoder(twin.normalize(images * (1 - masks)))
    sgd.zero_grad()
    F.cross_entropy(masked_logits, labels).backward()
    sgd.step()

    for (name, a), b in zip(
        masker.encoder.state_dict().items(), twin.encoder.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_pool_snapshot_used_for_masked_pass_is_not_updated():
    settings = dataclasses.replace(STEP_L100, hp=1.0, smf=1)
    masker = tiny_masker()
    casm = CASM(masker, settings, random.Random(0))
    images, labels = batch()
    casm.step(images, labels)
    first = copy.deepcopy(casm.pool.snapshots[0])
    casm.step(images, labels)  # hp = 1: the masked pass always uses a snapshot
    assert torch.equal(first["conv1.weight"], casm.pool.snapshots[0]["conv1.weight"])
    assert len(casm.pool.snapshots) == 2 and casm.step_count == 2


def test_unshared_mapping_trains_its_own_encoder_and_leaves_a_fixed_classifier_alone():
    torch.manual_seed(0)
    masker = build_masker("resnet18", 3, width=8, shared_encoder=False)
    masker.mapping_encoder.load_state_dict(masker.encoder.state_dict())
    classifier_before = copy.deepcopy(masker.encoder.state_dict())
    mapping_before = copy.deepcopy(masker.mapping_encoder.state_dict())
    casm = CASM(masker, STEP_F, random.Random(0))
    images, labels = batch()
    for _ in range(3):
        casm.step(images, labels)
    after = masker.encoder.state_dict()
    assert all(torch.equal(classifier_before[k], after[k]) for k in after)
    moved = [
        k
        for k, v in masker.mapping_encoder.state_dict().items()
        if not torch.equal(mapping_before[k], v)
    ]
    assert "conv1.weight" in moved and "layer4.1.conv2.weight" in moved
    assert not any(k.startswith("fc.") for k in moved)  # the mapping never reads the head


def test_unshared_masks_come_from_the_mapping_encoder():
    torch.manual_seed(0)
    masker = build_masker("resnet18", 3, width=8, shared_encoder=False).eval()
    images, _ = batch()
    masks, logits = masker(images)
    _, features = masker.mapping_encoder(masker.normalize(images))
    expected = masker.decoder(features, size=images.shape[-2:])
    assert torch.equal(masks, expected)
    assert torch.equal(logits, masker.encoder(masker.normalize(images))[0])


def test_training_steps_reduce_the_mapping_loss_on_a_fixed_batch():
    masker = tiny_masker()
    casm = CASM(masker, dataclasses.replace(STEP_F, lr_decoder=1e-2), random.Random(0))
    images, labels = batch()
    losses = [casm.step(images, labels).loss_mapping for _ in range(15)]
    assert min(losses[-3:]) < losses[0]


def test_run_writes_metrics_and_a_weights_only_checkpoint(tiny_data, tmp_path):
    from casm_deploy.checkpoint import load_masker
    from casm_deploy.training.train import run

    cfg = TrainConfig(
        data=str(tiny_data),
        out=str(tmp_path),
        name="t",
        width=8,
        image_size=32,
        pretrain_epochs=1,
        epochs=2,
        batch_size=8,
        pretrain_batch_size=8,
        workers=0,
        epoch_fraction=1.0,
    )
    run_dir = run(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in records if r["phase"] != "baseline"] == [
        ("pretrain", 1),
        ("casm", 1),
        ("casm", 2),
    ]
    last = records[-1]
    for key in (
        "train_acc",
        "train_acc_masked",
        "train_mask_mean",
        "train_mask_std",
        "train_mask_entropy",
        "train_mask_tv",
        "val_LE",
        "val_F1",
        "val_acc",
    ):
        assert key in last and 0 <= last[key] <= 1 + 1e-6, key
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["phase"] == "done" and checkpoint["model"]["num_classes"] == 3
    masker, spec = load_masker(run_dir / "checkpoint.pt")
    masks, logits = masker(torch.rand(2, 3, 32, 32))
    assert masks.shape == (2, 1, 32, 32) and logits.shape == (2, 3)
    assert json.loads((run_dir / "config.json").read_text())["name"] == "t"


def test_unshared_run_starts_the_mapping_encoder_from_the_classifier_and_saves_it(
    tiny_data, tmp_path
):
    from casm_deploy.checkpoint import load_masker
    from casm_deploy.training.train import run

    common = dict(data=str(tiny_data), out=str(tmp_path), width=8, image_size=32, workers=0)
    common |= dict(batch_size=8, pretrain_batch_size=8, epoch_fraction=1.0)
    clf = run(TrainConfig(name="c", classifier_only=True, pretrain_epochs=1, **common))
    run_dir = run(
        TrainConfig(
            name="u",
            weights=str(clf / "checkpoint.pt"),
            pretrain_epochs=0,
            epochs=1,
            reproduce="F",
            unshared=True,
            lr_decoder=0.0,  # the mapping does not move: it must equal the classifier it copied
            weight_decay=0.0,
            **common,
        )
    )
    masker, spec = load_masker(run_dir / "checkpoint.pt")
    assert spec.shared_encoder is False
    classifier = torch.load(clf / "checkpoint.pt", weights_only=True)["encoder"]
    for name, value in masker.mapping_encoder.state_dict().items():
        if name.startswith("fc.") or "running" in name or "num_batches" in name:
            continue  # the head is not the mapping's; BatchNorm statistics move in train mode
        assert torch.equal(value, classifier[name]), name
    masks, _ = masker(torch.rand(2, 3, 32, 32))
    assert masks.shape == (2, 1, 32, 32)


def test_run_with_stretch_resize(tiny_data, tmp_path):
    from casm_deploy.data.imagenet import list_images, own_boxes, read_classes
    from casm_deploy.errors import UserError
    from casm_deploy.evaluation.localisation import center_baseline
    from casm_deploy.training.train import run

    cfg = TrainConfig(
        data=str(tiny_data), out=str(tmp_path), name="s", width=8, image_size=32,
        pretrain_epochs=1, epochs=1, batch_size=8, pretrain_batch_size=8, workers=0,
        resize="stretch",
    )  # fmt: skip
    run_dir = run(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["phase"] == "casm" and 0 <= records[-1]["val_LE"] <= 1
    assert json.loads((run_dir / "config.json").read_text())["resize"] == "stretch"
    # The validation boxes follow the policy: the centre baseline is scored on stretched boxes.
    wnids = read_classes(tiny_data).wnids
    boxes = [
        own_boxes(path, wnids[label], tiny_data / "annotations", 32, "stretch")
        for path, label in list_images(tiny_data, "val", wnids)
    ]
    assert records[0] == {"phase": "baseline", **center_baseline(boxes, 32)}

    with pytest.raises(UserError, match="--loader dali cannot train with --resize stretch"):
        run(dataclasses.replace(cfg, name="d", loader="dali"))
    with pytest.raises(ValueError, match="--resize"):
        TrainConfig(resize="squash")


def test_asking_for_cuda_without_it_is_a_user_error(monkeypatch):
    from casm_deploy.common.devices import resolve_device
    from casm_deploy.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="not a device"):
        resolve_device("gpu0")


@pytest.mark.gpu
def test_casm_step_on_cuda_keeps_the_pool_on_the_cpu():
    masker = tiny_masker().cuda().to(memory_format=torch.channels_last)
    casm = CASM(masker, dataclasses.replace(STEP_L100, hp=1.0, smf=1), random.Random(0))
    images, labels = batch()
    for _ in range(2):
        out = casm.step(images.cuda(), labels.cuda())
    assert out.masks.device.type == "cuda"
    assert all(t.device.type == "cpu" for t in casm.pool.snapshots[0].values())


# Mixed precision ------------------------------------------------------------------------------


def real_batch(data, size=48, n=16):
    from casm_deploy.data.imagenet import read_classes
    from casm_deploy.data.loader import build_loader

    loader = build_loader(data, "train", read_classes(data).wnids, size, n, train=True, workers=0)
    images, labels, _ = next(iter(loader))
    return images, labels


def one_step(masker, settings, images, labels):
    casm = CASM(copy.deepcopy(masker), settings, random.Random(0))
    return casm, casm.step(images, labels)


def test_bf16_step_matches_fp32(tiny_data):
    """A CASM step under CPU bf16 autocast gives the fp32 losses within 1%.

    bf16 keeps 8 significant bits (a relative rounding error of 2**-9, 0.2%, per operation);
    through the network the losses move by at most 0.4% here. The classifier is fixed (F, eval
    mode): a trained one normalises with the batch statistics of 16 images, which amplifies the
    rounding of a random-init network's low-variance channels several-fold, and its masked pass
    follows a bf16 SGD step, so only its clean loss is compared (below).
    """
    images, labels = real_batch(tiny_data)
    masker = tiny_masker().to(memory_format=torch.channels_last)
    _, ref = one_step(masker, STEP_F, images, labels)
    casm, out = one_step(masker, dataclasses.replace(STEP_F, amp="bf16"), images, labels)
    assert casm.amp_dtype == torch.bfloat16 and out.loss_clean != ref.loss_clean  # bf16 ran
    # The same decisions (right on clean, fooled when masked) keep the area term comparable.
    assert (int(out.correct), int(out.correct_masked)) == (ref.correct, ref.correct_masked)
    for key in ("loss_clean", "loss_masked", "loss_mapping"):
        assert float(getattr(out, key)) == pytest.approx(float(getattr(ref, key)), rel=1e-2), key
    assert out.masks.dtype == torch.float32


def test_bf16_trained_classifier_keeps_weights_and_pool_in_fp32(tiny_data):
    images, labels = real_batch(tiny_data)
    masker = tiny_masker().to(memory_format=torch.channels_last)
    settings = dataclasses.replace(STEP_L100, hp=1.0, smf=1)  # a snapshot every step, always drawn
    _, ref = one_step(masker, settings, images, labels)
    casm, out = one_step(masker, dataclasses.replace(settings, amp="bf16"), images, labels)
    assert float(out.loss_clean) == pytest.approx(float(ref.loss_clean), rel=1e-2)  # same weights
    out = casm.step(images, labels)  # the masked pass through a snapshot
    assert all(torch.isfinite(v) for v in (out.loss_masked, out.loss_mapping))
    assert len(casm.pool.snapshots) == 2
    for snapshot in casm.pool.snapshots:
        assert all(t.dtype == torch.float32 for t in snapshot.values() if t.is_floating_point())
    assert all(p.dtype == torch.float32 for p in casm.masker.parameters())
    assert casm.scaler.state_dict() == {}  # bf16 needs no gradient scaler


def test_gradient_scaler_leaves_the_step_unchanged():
    """Each loss is scaled and its gradients unscaled (before the clipping): with a power-of-two
    scale and fp32 arithmetic, scaling is exact, so the step is bit-identical to the plain one."""
    images, labels = batch()
    settings = dataclasses.replace(STEP_L100, smf=1, grad_clip=0.1)  # the clipping bites
    plain = CASM(tiny_masker(), settings, random.Random(0))
    scaled = CASM(tiny_masker(), settings, random.Random(0))
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(4):  # both kinds of masked pass: the current classifier and a snapshot
        plain.step(images, labels)
        scaled.step(images, labels)
    for part in ("encoder", "decoder"):
        a = getattr(plain.masker, part).state_dict()
        b = getattr(scaled.masker, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert scaled.scaler.get_scale() == 2.0**12  # no overflow, no growth yet


def test_gradient_scaler_state_is_saved_and_restored():
    images, labels = batch()
    casm = CASM(tiny_masker(), STEP_L, random.Random(0))
    casm.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    casm.step(images, labels)
    state = casm.state_dict()
    assert state["scaler"]["scale"] == 2.0**12  # two updates per step: after each classifier step

    resumed = CASM(tiny_masker(), STEP_L, random.Random(0))
    resumed.scaler = torch.amp.GradScaler("cpu", growth_interval=1)
    resumed.load_state_dict(state)
    assert resumed.scaler.get_scale() == 2.0**12
    # A checkpoint from before --amp has no scaler: it still loads.
    old = {k: v for k, v in state.items() if k != "scaler"}
    CASM(tiny_masker(), STEP_L, random.Random(0)).load_state_dict(old)


def test_fp16_on_the_cpu_is_a_user_error():
    from casm_deploy.errors import UserError

    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        CASM(tiny_masker(), StepSettings(amp="fp16"), random.Random(0))
    with pytest.raises(ValueError, match="--amp"):
        TrainConfig(amp="fp8")


def test_run_under_bf16_writes_fp32_checkpoint_and_pool(tiny_data, tmp_path):
    from casm_deploy.checkpoint import load_checkpoint
    from casm_deploy.training.train import run

    cfg = TrainConfig(
        data=str(tiny_data),
        out=str(tmp_path),
        name="bf16",
        width=8,
        image_size=32,
        pretrain_epochs=1,
        epochs=1,
        batch_size=8,
        pretrain_batch_size=8,
        workers=0,
        smf=2,
        amp="bf16",
    )
    run_dir = run(cfg)
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["config"]["amp"] == "bf16"
    for part in ("encoder", "decoder"):
        tensors = checkpoint[part].values()
        assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    pool = torch.load(run_dir / checkpoint["pool_file"], weights_only=True)["snapshots"]
    assert all(t.dtype == torch.float32 for s in pool for t in s.values() if t.is_floating_point())


@pytest.mark.gpu
def test_fp16_step_on_cuda_scales_and_keeps_fp32_weights():
    masker = tiny_masker().cuda().to(memory_format=torch.channels_last)
    casm = CASM(masker, dataclasses.replace(STEP_L100, smf=1, amp="fp16"), random.Random(0))
    assert casm.scaler.is_enabled()
    images, labels = batch()
    for _ in range(3):
        out = casm.step(images.cuda(), labels.cuda())
    assert all(torch.isfinite(v) for v in (out.loss_clean, out.loss_mapping))
    assert all(p.dtype == torch.float32 for p in masker.parameters())
    assert casm.state_dict()["scaler"]["scale"] > 0
    assert all(t.dtype == torch.float32 for t in casm.pool.snapshots[0].values())
