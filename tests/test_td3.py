"""TD3 learner: gradients reach the CNN (the seed's validation tests), encoder modes, acting,
targets, TD3+BC, checkpoints and exact resume. CPU, tiny batches of random uint8 images."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.envs.spec import ObsSpec
from pipeline.errors import PipelineError, SpecMismatchError
from pipeline.train.networks import random_shift, scale_to_unit, shift_by_crop, shift_by_gather
from pipeline.train.td3 import TD3Agent, TD3Config, native_bf16

SPEC = ObsSpec()


@pytest.fixture(autouse=True)
def one_thread():
    # The test machine's cores are shared; one thread is also the fastest at these batch sizes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_obs(rng, b, spec=SPEC):
    return {
        "image": torch.from_numpy(rng.integers(0, 256, (b, *spec.image_shape), dtype=np.uint8)),
        "vector": torch.from_numpy(rng.standard_normal((b, spec.vector_dim), dtype=np.float32)),
    }


def make_batch(seed=0, b=8, offline=True, action=None, spec=SPEC):
    rng = np.random.default_rng(seed)
    if action is None:
        action = rng.uniform(-1, 1, (b, 2)).astype(np.float32)
    return {
        "obs": make_obs(rng, b, spec),
        "action": torch.as_tensor(np.broadcast_to(action, (b, 2)).copy()),
        "reward": torch.from_numpy(rng.standard_normal(b).astype(np.float32)),
        "next_obs": make_obs(rng, b, spec),
        "done": torch.from_numpy((rng.random(b) < 0.2).astype(np.float32)),
        "discount": torch.full((b,), 0.99**3),
        "offline": torch.full((b,), offline),
    }


def make_agent(spec=SPEC, **overrides):
    # fp32 unless a test asks (the default is bf16 convolutions on a CPU with native bf16): the
    # exact-gradient checks below compare against fp32 references
    return TD3Agent(spec, config=TD3Config(device="cpu", **{"amp": False, **overrides}))


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(module, before):
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


# ---------------------------------------------------------------- augmentation


def test_random_shift_is_replicate_pad_then_crop_per_sample():
    image = torch.randint(0, 256, (32, 4, 12, 12), dtype=torch.uint8)
    pad = 2
    out = random_shift(image, pad, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == image.shape
    padded = F.pad(image.float(), (pad,) * 4, mode="replicate")
    offsets = []
    for i in range(len(image)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(padded[i, :, dy : dy + 12, dx : dx + 12], out[i].float())
        ]
        assert matches, f"sample {i} is not a crop of its replicate-padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 5  # per-sample shifts, not one shift for the batch
    assert torch.equal(random_shift(image, 0), image)


def test_the_cpu_and_cuda_shifts_are_the_same_shift():
    """The CPU path (pad by concatenation, slice per sample) equals the CUDA path (two gathers)
    element for element, for every offset, on uint8 and on float images."""
    pad = 3
    shift = torch.tensor([(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)])
    for dtype in (torch.uint8, torch.float32):
        image = torch.randint(0, 256, (len(shift), 4, 10, 9)).to(dtype)
        assert torch.equal(shift_by_crop(image, shift, pad), shift_by_gather(image, shift, pad))


# ---------------------------------------------------------------- the seed's validation tests


@pytest.mark.parametrize("head", ["relu", "layernorm"])
def test_one_update_gives_every_encoder_parameter_a_nonzero_gradient(head):
    agent = make_agent(encoder_head=head)
    assert all(p.grad is None for p in agent.encoder.parameters())
    metrics = agent.update(make_batch())
    for name, p in agent.encoder.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} gradient is all zero"
    assert metrics["encoder_grad_norm"] > 0


def test_encoder_weights_and_features_change_over_100_updates():
    agent = make_agent()
    probe = make_obs(np.random.default_rng(99), 2)
    features_before = agent.extract_features(probe, enable_grad=False)
    weights_before = snapshot(agent.encoder)
    target_before = snapshot(agent.encoder_target)
    batches = [make_batch(seed=s, b=4) for s in range(4)]
    for i in range(100):
        metrics = agent.update(batches[i % 4])
    assert all(np.isfinite(v) for v in metrics.values())
    assert changed(agent.encoder, weights_before) == set(weights_before), "every CNN weight should move"
    assert changed(agent.encoder_target, target_before) == set(target_before)
    features_after = agent.extract_features(probe, enable_grad=False)
    assert not torch.allclose(features_before, features_after), "CNN features should adapt"


def test_layernorm_head_keeps_the_pixel_features_in_tanh_range_and_the_vector_as_it_was():
    relu, layernorm = make_agent(), make_agent(encoder_head="layernorm")
    obs = make_obs(np.random.default_rng(7), 6)
    obs["image"] = obs["image"] // 2 + 128  # bright frames: large pre-activations
    pixels = layernorm.extract_features(obs, enable_grad=False)[:, :512]
    assert pixels.abs().max() < 1 and (pixels < 0).any()  # tanh range, both signs
    assert (relu.extract_features(obs, enable_grad=False)[:, :512] >= 0).all()
    torch.testing.assert_close(layernorm.extract_features(obs, enable_grad=False)[:, 512:],
                               relu.extract_features(obs, enable_grad=False)[:, 512:])
    with pytest.raises(PipelineError, match="encoder head 'batchnorm'"):
        TD3Config(encoder_head="batchnorm")


def test_frozen_encoder_gets_no_gradient_and_never_changes():
    agent = make_agent(encoder_update="frozen")
    encoder, target = snapshot(agent.encoder), snapshot(agent.encoder_target)
    actor, critic = snapshot(agent.actor), snapshot(agent.critic)
    for s in range(6):
        metrics = agent.update(make_batch(seed=s, b=4))
    assert all(p.grad is None for p in agent.encoder.parameters())
    assert metrics["encoder_grad_norm"] == 0.0
    assert not changed(agent.encoder, encoder) and not changed(agent.encoder_target, target)
    assert changed(agent.actor, actor) and changed(agent.critic, critic)
    assert not agent.extract_features(make_batch()["obs"], enable_grad=True).requires_grad


@pytest.mark.parametrize("mode, reaches_encoder", [("actor+critic", True), ("critic", False)])
def test_actor_loss_reaches_encoder_only_in_actor_critic_mode(mode, reaches_encoder):
    agent = make_agent(encoder_update=mode)
    batch = make_batch()
    agent.update_critic(batch)
    agent.encoder.zero_grad(set_to_none=True)
    agent.critic.zero_grad(set_to_none=True)
    encoder, actor, critic = snapshot(agent.encoder), snapshot(agent.actor), snapshot(agent.critic)

    metrics = agent.update_actor(batch)

    grads = [p.grad for p in agent.encoder.parameters()]
    if reaches_encoder:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        assert changed(agent.encoder, encoder) == set(encoder)
        assert metrics["encoder_grad_norm"] > 0
    else:
        assert all(g is None for g in grads)
        assert not changed(agent.encoder, encoder)
        assert "encoder_grad_norm" not in metrics
    assert changed(agent.actor, actor) and metrics["actor_grad_norm"] > 0
    # the critic judges the actor; the actor loss must not train it
    assert all(p.grad is None for p in agent.critic.parameters()) and not changed(agent.critic, critic)


def _encoder_grads_of(agent, loss_of_features):
    """Gradients of ``loss_of_features(phi)`` w.r.t. the encoder weights, phi = encoder(obs) live."""
    params = list(agent.encoder.parameters())
    return params, torch.autograd.grad(loss_of_features, params)


def test_actor_critic_mode_reaches_the_encoder_through_the_policy_only():
    # The actor loss must be -Q1(sg(phi), pi(phi)): the critic reads detached features, so the CNN
    # is trained to act better, not to inflate Q through the critic's state input.
    agent = make_agent(encoder_update="actor+critic", augment=False)
    batch = make_batch()
    phi = agent.encoder(batch["obs"])
    params, expected = _encoder_grads_of(agent, -agent.critic.q1(phi.detach(), agent.actor(phi)).mean())
    phi = agent.encoder(batch["obs"])
    _, with_critic_path = _encoder_grads_of(agent, -agent.critic.q1(phi, agent.actor(phi)).mean())
    assert any(not torch.allclose(a, b) for a, b in zip(expected, with_critic_path))  # the test can tell

    agent.update_actor(batch)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g)

    # a policy that ignores its input gives the encoder no gradient at all from the actor loss
    agent = make_agent(encoder_update="actor+critic", augment=False)
    torch.nn.init.zeros_(agent.actor.net[-1].weight)
    agent.update_actor(batch)
    assert all(p.grad is None or not p.grad.any() for p in agent.encoder.parameters())


def test_td3_bc_reaches_the_encoder_in_critic_mode_but_the_q_term_does_not():
    agent = make_agent(bc_alpha=2.5, augment=False)  # default encoder_update="critic"
    batch = make_batch(b=8)
    offline = torch.tensor([True] * 5 + [False] * 3)
    label = torch.from_numpy(np.random.default_rng(7).uniform(-1, 1, (8, 2)).astype(np.float32))
    batch.update(offline=offline, bc_action=label)  # the expert's label differs from the action taken
    phi = agent.encoder(batch["obs"])
    per_row = ((agent.actor(phi) - label) ** 2).mean(1)
    bc_only = (per_row * offline).sum() / offline.sum()
    params, expected = _encoder_grads_of(agent, bc_only)
    before = snapshot(agent.encoder)

    metrics = agent.update_actor(batch)

    for p, g in zip(params, expected):  # exactly the BC term's gradient: no Q term in it
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g)
    assert metrics["bc_loss"] == pytest.approx(bc_only.item(), rel=1e-5)
    assert metrics["encoder_grad_norm"] > 0
    assert changed(agent.encoder, before) == set(before)  # the encoder optimiser stepped on it
    assert all(p.grad is None for p in agent.critic.parameters())

    # without a bc_action field the target is the batch's action
    agent = make_agent(bc_alpha=2.5, augment=False)
    batch = make_batch(b=8)
    phi = agent.encoder(batch["obs"])
    expected_bc = ((agent.actor(phi) - batch["action"]) ** 2).mean()
    assert agent.update_actor(batch)["bc_loss"] == pytest.approx(expected_bc.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["critic", "actor+critic"])
def test_an_update_without_metrics_is_the_same_update_and_returns_none(mode):
    # The training loop asks for metrics (gradient norms) only on the updates it logs.
    measured, silent = make_agent(seed=5, encoder_update=mode), make_agent(seed=5, encoder_update=mode)
    for s in range(4):  # two actor steps and target updates among them
        batch = make_batch(seed=s, b=4)
        full = measured.update(batch)
        assert silent.update(batch, metrics=False) == {}
        assert {"critic_grad_norm", "encoder_grad_norm"} <= set(full)
    assert "actor_grad_norm" in full
    for name in ("encoder", "actor", "critic", "encoder_target", "actor_target", "critic_target"):
        a, b = getattr(measured, name).state_dict(), getattr(silent, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_the_self_predictive_loss_adds_its_gradient_to_the_cnn_and_leaves_the_critic_alone():
    # Same seed with the loss off and on: the same networks (the predictor is built last), so the
    # difference between their encoder gradients is exactly the weighted prediction loss's.
    weight = 0.5
    plain, predicting = make_agent(augment=False, seed=3), make_agent(augment=False, seed=3, prediction_weight=weight)
    assert plain.predictor is None and predicting.predictor is not None
    for name in ("encoder", "actor", "critic", "encoder_target"):
        a, b = getattr(plain, name).state_dict(), getattr(predicting, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    batch = make_batch(b=8)
    cnn = slice(0, predicting.config.features_dim)
    with torch.no_grad():  # the target: the *target* encoder's CNN features of next_obs
        target = predicting.encoder_target(batch["next_obs"])[:, cnn]
    guess = predicting.predictor(predicting.encoder(batch["obs"])[:, cnn], batch["action"])
    prediction_loss = (2 - 2 * F.cosine_similarity(guess, target, dim=1)).mean()
    params, expected = _encoder_grads_of(predicting, weight * prediction_loss)
    before = snapshot(predicting.predictor)

    plain_metrics = plain.update_critic(batch)
    metrics = predicting.update_critic(batch)

    assert metrics["prediction_loss"] == pytest.approx(prediction_loss.item(), rel=1e-5)
    assert "prediction_loss" not in plain_metrics
    assert metrics["critic_loss"] == pytest.approx(plain_metrics["critic_loss"], rel=1e-6)
    for p, q, g in zip(params, plain.encoder.parameters(), expected):
        torch.testing.assert_close(p.grad, q.grad + g)
    assert any(g.abs().max() > 0 for g in expected)
    for p, q in zip(predicting.critic.parameters(), plain.critic.parameters()):
        torch.testing.assert_close(p.grad, q.grad)  # the prediction loss does not reach the critic
    assert changed(predicting.predictor, before) == set(before)  # the predictor learns too


def test_the_self_predictive_loss_cannot_go_with_a_frozen_encoder():
    with pytest.raises(PipelineError, match="frozen"):
        TD3Config(encoder_update="frozen", prediction_weight=1.0)
    with pytest.raises(PipelineError, match="prediction_weight"):
        TD3Config(prediction_weight=-1.0)


def _pretend_native_bf16(monkeypatch, native: bool):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)


def _cnn_output_dtypes(agent) -> set:
    seen = set()
    for conv in (m for m in agent.encoder.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    agent.update(make_batch(seed=1))
    return seen


@pytest.mark.parametrize("native, amp, expected", [(True, None, torch.bfloat16), (True, True, torch.bfloat16),
                                                   (False, None, torch.float32), (False, True, torch.float32),
                                                   (True, False, torch.float32)])
def test_the_convolutions_run_in_bf16_by_default_only_on_a_cpu_with_native_bf16(monkeypatch, native, amp, expected):
    # A CPU with AVX512-BF16 / AMX runs the CNN's bf16 convolutions 1.4-1.7x faster than fp32, and
    # with them (the linear head in fp32) the quick start learned in as many training seeds; one
    # without emulates them, slower than fp32. amp=False keeps fp32 anywhere.
    _pretend_native_bf16(monkeypatch, native)
    assert native_bf16(torch.device("cpu")) is native
    assert native_bf16(torch.device("cuda"))  # every CUDA GPU the agent runs on (no tensor is made)
    agent = make_agent(amp=amp, augment=False)
    assert agent.bf16_cnn is (expected == torch.bfloat16)
    assert _cnn_output_dtypes(agent) == {expected}


def test_scale_to_unit_is_the_float_division_then_the_cast_and_leaves_its_input_alone():
    every_value = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8).expand(4, 4, 8, 8)
    image = every_value.contiguous(memory_format=torch.channels_last)
    reference = image.float() / 255.0
    assert torch.equal(scale_to_unit(image), reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scaled = scale_to_unit(image)
    assert scaled.dtype == torch.bfloat16 and torch.equal(scaled, reference.to(torch.bfloat16))
    assert scaled.is_contiguous(memory_format=torch.channels_last)
    floats = reference * 255.0  # a float image in [0, 255]: .to() returns it as is, so no in-place divide
    before = floats.clone()
    assert torch.equal(scale_to_unit(floats), floats / 255.0) and torch.equal(floats, before)


def test_autocast_covers_the_convolutions_only_heads_and_td_target_run_in_fp32(monkeypatch):
    # The agent enters the same torch.autocast(device, bfloat16) context on CUDA and on a CPU with
    # native bf16, so this checks on any CPU which modules run inside its scope (emulated bf16 where
    # the CPU has none).
    _pretend_native_bf16(monkeypatch, True)
    agent = make_agent(augment=False, amp=True)
    seen: dict[str, set] = {}

    def record(name):
        def hook(module, inputs, output):
            for tensor in output if isinstance(output, tuple) else (output,):
                seen.setdefault(name, set()).add(tensor.dtype)
        return hook

    for net in ("encoder", "encoder_target", "actor", "actor_target", "critic", "critic_target"):
        for name, module in getattr(agent, net).named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.register_forward_hook(record(f"{net}.{name}"))
        getattr(agent, net).register_forward_hook(record(net))
    agent.update(make_batch(seed=1))
    agent.update(make_batch(seed=2))  # the delayed actor step and the targets
    agent.select_action({k: v.numpy() for k, v in make_batch(seed=3)["obs"].items()})

    cnn = {n: d for n, d in seen.items() if n.startswith(("encoder.cnn", "encoder_target.cnn"))}
    assert cnn and all(d == {torch.bfloat16} for d in cnn.values()), cnn  # autocast was really on
    # only the convolutions: the encoder's linear head (3136 -> 512) reads and writes fp32
    assert seen["encoder.head.0"] == seen["encoder_target.head.0"] == {torch.float32}
    assert seen["encoder"] == seen["encoder_target"] == {torch.float32}  # features leave it as fp32
    heads = {n: d for n, d in seen.items() if n.startswith(("actor", "critic"))}
    assert {n.split(".")[0] for n in heads} == {"actor", "actor_target", "critic", "critic_target"}
    assert all(d == {torch.float32} for d in heads.values()), heads


def test_one_vector_floor_a_field_constant_in_warmup_is_centred_not_amplified():
    from pipeline.train.loop import _vector_stats
    from pipeline.train.networks import Encoder

    rng = np.random.default_rng(0)
    warmup = [rng.standard_normal(SPEC.vector_dim).astype(np.float32) for _ in range(200)]
    for i, v in enumerate(warmup):
        v[0] = 3.0  # constant during warm-up
        v[1] = 1e-4 * (i % 2)  # as good as constant
    mean, std = _vector_stats(None, None, warmup)
    encoder = Encoder(SPEC, vector_mean=mean, vector_std=std)
    later = mean.copy()
    later[0] += 1.0
    later[1] += 1.0
    later[2] += 2.0 * std[2]
    obs = {"image": torch.zeros((1, *SPEC.image_shape), dtype=torch.uint8), "vector": torch.from_numpy(later)[None]}
    normalised = encoder(obs)[0, -SPEC.vector_dim:]
    assert normalised[0].item() == pytest.approx(1.0)  # not 1000 (the old 1e-3 floor)
    assert normalised[1].item() == pytest.approx(1.0, abs=1e-3)
    assert normalised[2].item() == pytest.approx(2.0, rel=1e-4)  # a varying field is standardised


# ---------------------------------------------------------------- acting


def test_select_action_single_and_batch():
    agent = make_agent()
    rng = np.random.default_rng(1)
    batch = {k: v.numpy() for k, v in make_obs(rng, 3).items()}
    single = {k: v[0] for k, v in batch.items()}

    a = agent.select_action(single)
    assert a.shape == (2,) and a.dtype == np.float32
    np.testing.assert_array_equal(a, agent.select_action(single))  # deterministic without noise
    actions = agent.select_action(batch)
    assert actions.shape == (3, 2)
    np.testing.assert_allclose(actions[0], a, atol=1e-6)

    noisy = agent.select_action(batch, noise=0.3)
    assert not np.allclose(noisy, actions) and np.all(np.abs(noisy) <= 1.0)
    saturated = agent.select_action(batch, noise=100.0)
    assert np.all(np.abs(saturated) <= 1.0) and np.all(np.abs(saturated) > 0.9)

    with pytest.raises(SpecMismatchError, match="vector"):
        agent.select_action({"image": single["image"], "vector": single["vector"][:5]})


@pytest.mark.parametrize("target_encoder", [True, False])
def test_averaged_actions_come_from_the_polyak_networks_and_deployed_policies_use_them(target_encoder):
    from pipeline.policies import AgentPolicy

    agent = make_agent(target_encoder=target_encoder)
    for _ in range(4):  # online networks move away from their averages
        agent.update(make_batch(seed=5))
    rng = np.random.default_rng(2)
    batch = {k: v.numpy() for k, v in make_obs(rng, 3).items()}
    online, averaged = agent.select_action(batch), agent.select_action(batch, averaged=True)
    assert not np.allclose(online, averaged)

    with torch.no_grad():  # the same numbers by hand from the averages
        encoder = agent.encoder_target if target_encoder else agent.encoder
        features = encoder({"image": torch.from_numpy(batch["image"]), "vector": torch.from_numpy(batch["vector"])})
        np.testing.assert_allclose(averaged, agent.actor_target(features).numpy(), atol=1e-6)

    policy = AgentPolicy(agent)  # what eval and the training loop's evaluations drive with
    policy.reset(0)
    single = {k: v[1] for k, v in batch.items()}
    np.testing.assert_allclose(policy.act(single, {}), averaged[1], atol=1e-6)


# ---------------------------------------------------------------- targets and delay


def test_actor_and_targets_update_every_policy_delay_steps_by_polyak_tau():
    agent = make_agent(tau=0.1, policy_delay=2)
    assert agent.encoder_target is not agent.encoder
    nets = ("encoder", "actor", "critic")
    targets = {n: snapshot(getattr(agent, f"{n}_target")) for n in nets}
    actor = snapshot(agent.actor)

    first = agent.update(make_batch(seed=1))
    assert "actor_loss" not in first and not changed(agent.actor, actor)
    assert all(not changed(getattr(agent, f"{n}_target"), targets[n]) for n in nets)

    second = agent.update(make_batch(seed=2))
    assert "actor_loss" in second and changed(agent.actor, actor)
    for n in nets:
        online = dict(getattr(agent, n).named_parameters())
        for name, p in getattr(agent, f"{n}_target").named_parameters():
            expected = targets[n][name] + 0.1 * (online[name].detach() - targets[n][name])
            torch.testing.assert_close(p, expected, msg=f"{n}_target.{name} is not a Polyak step")
        assert changed(getattr(agent, f"{n}_target"), targets[n])


def _td_target_by_hand(agent, batch, next_encoder):
    with torch.no_grad():
        next_features = next_encoder(batch["next_obs"])
        next_q = torch.min(*agent.critic_target(next_features, agent.actor_target(next_features)))
        return float((batch["reward"] + batch["discount"] * (1 - batch["done"]) * next_q).mean())


@pytest.mark.parametrize("target_encoder", [True, False])
def test_td_target_reads_next_obs_through_the_target_encoder_or_with_the_option_off_the_online_one(
        target_encoder):
    # After a few updates the online encoder has moved and the Polyak copy (tau 0.1 here) lags it,
    # so the two give different targets. No target noise, no augmentation: y can be computed by hand.
    agent = make_agent(augment=False, policy_noise=0.0, tau=0.1, target_encoder=target_encoder)
    for s in range(4):
        agent.update(make_batch(seed=s, b=4))
    assert (agent.encoder_target is not None) == target_encoder
    batch = make_batch(seed=9, b=4)
    online = _td_target_by_hand(agent, batch, agent.encoder)
    expected = _td_target_by_hand(agent, batch, agent.encoder_target) if target_encoder else online
    assert target_encoder is False or abs(expected - online) > 1e-4  # the test can tell them apart
    metrics = agent.update_critic(batch)
    assert metrics["q_target_mean"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- TD3+BC


def test_td3_bc_pulls_actions_toward_dataset_actions_on_offline_rows_only():
    goal = np.array([0.6, -0.4], dtype=np.float32)

    def distance_after(offline, steps=40):
        agent = make_agent(bc_alpha=0.5, augment=False)
        batch = make_batch(seed=3, offline=offline, action=goal)
        dist = lambda: float(np.mean((agent.select_action(batch["obs"]) - goal) ** 2))
        start = dist()
        for _ in range(steps):
            metrics = agent.update_actor(batch)
        return start, dist(), metrics

    start, offline_end, metrics = distance_after(offline=True)
    assert metrics["bc_loss"] > 0
    assert offline_end < 0.5 * start
    _, online_end, metrics = distance_after(offline=False)
    assert metrics["bc_loss"] == 0.0
    assert online_end > 2 * offline_end
    assert "bc_loss" not in make_agent().update_actor(make_batch())


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("head", ["relu", "layernorm"])
def test_save_load_round_trip_with_weights_only(tmp_path, head):
    rng = np.random.default_rng(5)
    agent = TD3Agent(SPEC, config=TD3Config(device="cpu", seed=3, encoder_head=head),
                     vector_mean=rng.standard_normal(23), vector_std=rng.uniform(0.5, 2, 23))
    for s in range(3):
        agent.update(make_batch(seed=s, b=4))
    path = agent.save(tmp_path / "ckpt" / "last.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left behind

    raw = torch.load(path, weights_only=True)
    assert raw["num_updates"] == 3 and raw["obs_spec"] == SPEC.to_dict()
    loaded = TD3Agent.load(path, map_location="cpu", expected_obs_spec=SPEC)
    assert loaded.config.encoder_head == head
    torch.testing.assert_close(loaded.encoder.vector_std, agent.encoder.vector_std)
    obs = {k: v.numpy() for k, v in make_obs(rng, 4).items()}
    np.testing.assert_array_equal(loaded.select_action(obs), agent.select_action(obs))
    np.testing.assert_array_equal(loaded.select_action(obs, noise=0.2), agent.select_action(obs, noise=0.2))

    # One commit (2ee1631) wrote checkpoints without a target encoder and without the option: they
    # load as target_encoder=False, act the same, and save again without one.
    without = {k: v for k, v in raw.items() if k != "encoder_target"}
    without["config"] = {k: v for k, v in raw["config"].items() if k != "target_encoder"}
    torch.save(without, tmp_path / "no_target.pt")
    from_without = TD3Agent.load(tmp_path / "no_target.pt", map_location="cpu", expected_obs_spec=SPEC)
    assert from_without.encoder_target is None and from_without.config.target_encoder is False
    np.testing.assert_array_equal(from_without.select_action(obs), agent.select_action(obs))
    assert "encoder_target" not in from_without.state_dict()


def test_checkpoint_errors_are_one_line_pipeline_errors(tmp_path):
    speed_only = ObsSpec(vector_fields="speed")
    path = make_agent(spec=speed_only).save(tmp_path / "speed.pt")
    with pytest.raises(SpecMismatchError, match="vector_fields"):
        TD3Agent.load(path, expected_obs_spec=SPEC)
    with pytest.raises(SpecMismatchError, match="vector_fields"):
        make_agent().load_state_dict(torch.load(path, weights_only=True))
    assert TD3Agent.load(path, expected_obs_spec=speed_only).obs_spec == speed_only

    with pytest.raises(PipelineError, match="not found"):
        TD3Agent.load(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="cannot read checkpoint") as err:
        TD3Agent.load(garbage)
    assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match="encoder update"):
        TD3Config(encoder_update="sometimes")


def test_a_save_interrupted_midway_keeps_the_old_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    agent = make_agent()
    path = agent.save(tmp_path / "last.pt")
    before = path.read_bytes()

    def interrupted_save(obj, f):  # a second Ctrl-C while the final checkpoint is being written
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        agent.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("prediction_weight", [0.0, 0.5])
def test_resume_from_checkpoint_gives_identical_next_update(tmp_path, prediction_weight):
    batches = [make_batch(seed=s, b=4) for s in range(4)]
    straight = make_agent(seed=7, prediction_weight=prediction_weight)
    interrupted = make_agent(seed=7, prediction_weight=prediction_weight)
    for b in batches[:3]:
        straight.update(b)
        interrupted.update(b)
    resumed = TD3Agent.load(interrupted.save(tmp_path / "mid.pt"), map_location="cpu")
    del interrupted

    # update 4 runs the delayed actor step and the target averaging: counter, optimiser moments,
    # augmentation and target-noise RNG must all have been restored
    assert straight.update(batches[3]) == resumed.update(batches[3])
    names = ["encoder", "actor", "critic", "encoder_target", "actor_target", "critic_target"]
    for name in names + (["predictor"] if prediction_weight else []):
        a, b = getattr(straight, name).state_dict(), getattr(resumed, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (resumed.predictor is None) == (prediction_weight == 0)
    obs = {k: v.numpy() for k, v in batches[0]["obs"].items()}
    np.testing.assert_array_equal(straight.select_action(obs, 0.1), resumed.select_action(obs, 0.1))
