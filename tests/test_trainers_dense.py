"""The dense recipes: StandardTrainerAprilUpdate, GatedSAETrainer, PAnnealTrainer, GatedAnnealTrainer
(and the GatedAutoEncoder dictionary)."""
import copy
import json

import pytest
import torch

from dictionary_learning import AutoEncoder, GatedAutoEncoder
from dictionary_learning.synthetic import SyntheticActivations, mean_max_cosine_similarity
from dictionary_learning.training import ConstrainedAdam, build_trainer, trainSAE

D, F = 16, 64
RECIPES = ["StandardTrainerAprilUpdate", "GatedSAETrainer", "PAnnealTrainer", "GatedAnnealTrainer"]
ANNEAL = dict(anneal_start=4, n_sparsity_updates=4, p_end=0.2)  # changes after steps 4, 8, 12, 16 of 20


def make_trainer(name, steps=20, **kwargs):
    cfg = dict(trainer=name, activation_dim=D, dict_size=F, warmup_steps=2, seed=0)
    if "Anneal" in name:
        cfg.update(ANNEAL)
    cfg.update(kwargs)
    return build_trainer(cfg, steps=steps)


def random_batches(n, batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, D, generator=g) for _ in range(n)]


def gated_with_random_biases(seed=0):
    torch.manual_seed(seed)
    ae = GatedAutoEncoder(D, F)
    with torch.no_grad():
        for p in (ae.b_dec, ae.b_gate, ae.b_mag, ae.r_mag):
            p.normal_(0, 0.5)
    return ae


# --- GatedAutoEncoder ---------------------------------------------------------------------------


def test_gated_state_dict_keys_and_init():
    torch.manual_seed(0)
    ae = GatedAutoEncoder(D, F)
    shapes = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    assert shapes == {  # the key names of saprmarks/dictionary_learning
        "decoder_bias": (D,), "encoder.weight": (F, D), "r_mag": (F,), "gate_bias": (F,), "mag_bias": (F,),
        "decoder.weight": (D, F),
    }
    torch.testing.assert_close(ae.W_dec.T.norm(dim=0), torch.ones(F))
    assert torch.equal(ae.W_enc.T, ae.W_dec)
    for name in ("b_dec", "r_mag", "b_gate", "b_mag"):
        assert torch.equal(getattr(ae, name), torch.zeros_like(getattr(ae, name))), name


def test_gated_features_are_gate_times_magnitude():
    ae = gated_with_random_biases()
    x = torch.randn(200, D)
    pi_gate = (x - ae.b_dec) @ ae.W_enc + ae.b_gate
    w_mag = torch.exp(ae.r_mag)[:, None] * ae.W_enc.T
    torch.testing.assert_close(ae.magnitude_weight.T, w_mag)
    pi_mag = (x - ae.b_dec) @ w_mag.T + ae.b_mag
    f, gate = ae.encode(x, return_gate=True)
    closed = pi_gate <= 0
    assert closed.any() and (~closed).any()
    assert torch.equal(f == 0, closed | (pi_mag <= 0))  # zero exactly where the gate is shut (or π_mag ≤ 0)
    torch.testing.assert_close(f[~closed], torch.relu(pi_mag)[~closed])
    torch.testing.assert_close(gate, torch.relu(pi_gate))
    torch.testing.assert_close(ae.decode(f), f @ ae.W_dec + ae.b_dec)
    x_hat, f_out = ae(x, output_features=True)
    torch.testing.assert_close(f_out, f)
    torch.testing.assert_close(x_hat, ae.decode(f))


def test_gated_3d_input_matches_flattened():
    ae = gated_with_random_biases()
    x = torch.randn(3, 5, D)
    x_hat, f = ae(x, output_features=True)
    assert x_hat.shape == (3, 5, D) and f.shape == (3, 5, F)
    torch.testing.assert_close(x_hat.reshape(15, D), ae(x.reshape(15, D)))
    torch.testing.assert_close(f.reshape(15, F), ae.encode(x.reshape(15, D)))


def test_gated_save_load_round_trip(tmp_path):
    ae = gated_with_random_biases()
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    loaded = GatedAutoEncoder.from_pretrained(tmp_path / "ae.pt")
    assert (loaded.activation_dim, loaded.dict_size) == (D, F)
    x = torch.randn(3, 4, D)
    assert torch.equal(loaded(x), ae(x))
    assert torch.equal(loaded.encode(x), ae.encode(x))
    as_double = GatedAutoEncoder.from_pretrained(tmp_path / "ae.pt", dtype=torch.float64)
    assert as_double.r_mag.dtype == torch.float64
    with torch.device("meta"):  # how from_state_dict builds it: no in-place init on meta tensors
        assert GatedAutoEncoder(D, F).W_dec.T.is_meta
    torch.save(AutoEncoder(D, F).state_dict(), tmp_path / "standard.pt")
    with pytest.raises(ValueError, match="decoder_bias"):
        GatedAutoEncoder.from_pretrained(tmp_path / "standard.pt")


def test_gated_scale_biases_folds_input_scale():
    ae = gated_with_random_biases()
    scale = 3.7
    x = torch.randn(50, D)
    x_hat_scaled, f_scaled = ae(x * scale, output_features=True)
    ae.scale_biases(1 / scale)
    x_hat, f = ae(x, output_features=True)
    torch.testing.assert_close(x_hat, x_hat_scaled / scale)
    torch.testing.assert_close(f, f_scaled / scale)


# --- StandardTrainerAprilUpdate -----------------------------------------------------------------


def test_april_init_schedules_and_optimizer():
    trainer = make_trainer("StandardTrainerAprilUpdate", steps=1000, lr=1e-3, warmup_steps=10)
    ae = trainer.ae
    torch.testing.assert_close(ae.W_dec.T.norm(dim=0), torch.full((F,), 0.1))
    assert torch.equal(ae.W_enc.T, ae.W_dec)
    assert not ae.b_dec.any() and not ae.b_enc.any()
    assert type(trainer.optimizer) is torch.optim.Adam
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    # λ warms up over the first 5% of the run, the LR decays to 0 over the last 20%
    assert trainer.cfg.sparsity_warmup_steps == 50 and trainer.cfg.decay_start == 800
    assert trainer.config["sparsity_warmup_steps"] == 50
    trainer.set_lr(900)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)


def test_april_sparsity_is_decoder_norm_weighted_l1():
    trainer = make_trainer("StandardTrainerAprilUpdate", steps=1000, sparsity_penalty=0.7)
    ae = trainer.ae
    with torch.no_grad():
        ae.W_dec.T.mul_(torch.rand(F) * 3)  # unequal column norms
        ae.b_enc.fill_(0.05)
    x = random_batches(1)[0]
    f = torch.relu((x - ae.b_dec) @ ae.W_enc + ae.b_enc)
    x_hat = f @ ae.W_dec + ae.b_dec
    norms = ae.W_dec.T.norm(dim=0)
    by_hand = sum(f[b, i] * norms[i] for b in range(x.shape[0]) for i in range(F)) / x.shape[0]
    mse = (x - x_hat).pow(2).sum(-1).mean()
    for step, warm in [(10, 11 / 50), (600, 1.0)]:
        out = trainer.loss(x, step)
        torch.testing.assert_close(out.metrics["sparsity_loss"], by_hand)
        torch.testing.assert_close(out.loss, mse + 0.7 * warm * by_hand)
    # the penalty's gradient reaches the decoder norms
    trainer.loss(x, 600).loss.backward()
    assert ae.W_dec.grad.T.abs().sum() > 0


def test_april_clips_gradient_norm_and_keeps_decoder_free():
    trainer = make_trainer("StandardTrainerAprilUpdate", steps=1000, lr=1e-2, warmup_steps=1)
    x = 10 * random_batches(1)[0]
    trainer.loss(x, 600).loss.backward()
    params = list(trainer.ae.parameters())
    grads_before = [p.grad.clone() for p in params]
    norm_before = torch.cat([g.flatten() for g in grads_before]).norm()
    assert norm_before > 10
    trainer.before_optimizer_step(600)
    norm_after = torch.cat([p.grad.flatten() for p in params]).norm()
    assert norm_after <= 1 + 1e-5
    for p, g in zip(params, grads_before):  # rescaled, same direction
        torch.testing.assert_close(p.grad, g / norm_before, rtol=1e-4, atol=1e-7)
    for step, x in enumerate(random_batches(10)):
        trainer.update(step, x)
    norms = trainer.ae.W_dec.T.norm(dim=0)
    assert (norms - 0.1).abs().max() > 1e-3 and (norms - 1).abs().min() > 0.1  # neither init nor unit norm


# --- GatedSAETrainer ----------------------------------------------------------------------------


def test_gated_loss_terms():
    trainer = make_trainer("GatedSAETrainer", sparsity_penalty=0.3)
    with torch.no_grad():
        trainer.ae.load_state_dict(gated_with_random_biases().state_dict())
    ae, x = trainer.ae, random_batches(1)[0]
    f, gate = ae.encode(x, return_gate=True)
    recon = (x - ae.decode(f)).pow(2).sum(-1).mean()
    aux = (x - gate @ ae.W_dec - ae.b_dec).pow(2).sum(-1).mean()
    l1 = gate.abs().sum(-1).mean()
    out = trainer.loss(x, step=5)
    torch.testing.assert_close(out.loss, recon + 0.3 * l1 + aux)
    torch.testing.assert_close(out.metrics["aux_loss"], aux)
    torch.testing.assert_close(out.metrics["sparsity_loss"], l1)


@pytest.mark.parametrize("name", ["GatedSAETrainer", "GatedAnnealTrainer"])
@pytest.mark.parametrize("gate_shift", [0.0, -2.5])  # half the gates open (dense path), ~1% open (sparse)
def test_gated_loss_and_gradients_match_the_formula_on_both_paths(name, gate_shift):
    """The trainer's loss on dense features (GatedEncode) and on the open gates only
    (SparseCodes, sparse kernels) equals the paper's loss written densely, with the same
    gradient for every parameter (float64)."""
    from dictionary_learning.kernels import SparseCodes

    # W_gate = W_decᵀ: the gate shifts are in units of a unit-norm gate column's pre-activations
    trainer = make_trainer(name, dict_size=512, sparsity_penalty=0.3, init_encoder_scale=1.0)
    ae = trainer.ae.double()
    with torch.no_grad():
        for p in (ae.b_dec, ae.b_gate, ae.b_mag, ae.r_mag):
            p.normal_(0, 0.5)
        ae.b_gate.add_(gate_shift)
    x = torch.randn(256, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p_norm = 1.0
    if name == "GatedAnnealTrainer":
        trainer.anneal.n_changes_done = 2  # p = 0.6: the annealed Lp^p penalty, not L1
        p_norm = trainer.p
        assert p_norm == pytest.approx(0.6)

    def formula_loss():
        f, gate = _gated_formula(ae, x)
        recon = (x - f @ ae.W_dec - ae.b_dec).pow(2).sum(-1).mean()
        aux = (x - gate @ ae.W_dec.T.detach().T - ae.b_dec.detach()).pow(2).sum(-1).mean()
        penalty = 0.3 * gate.pow(p_norm).sum(-1).mean()
        return recon + penalty + aux

    results = []
    for loss_fn in (lambda: trainer.loss(x, step=50), formula_loss):
        ae.zero_grad()
        out = loss_fn()
        loss = out.loss if hasattr(out, "loss") else out
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in ae.parameters()])
        if hasattr(out, "features"):
            assert isinstance(out.features, SparseCodes) == (gate_shift < 0)
            l0 = (out.features.values.numel() if gate_shift < 0 else int((out.features > 0).sum())) / len(x)
    assert 2 < l0 < 512 * 0.4
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _gated_formula(ae, x):
    """f = 1[π_gate > 0] ⊙ ReLU(π_mag) and ReLU(π_gate), by plain autograd."""
    pre = (x - ae.b_dec) @ ae.W_enc
    gate_pre = pre + ae.b_gate
    magnitude = torch.relu(ae.r_mag.exp() * pre + ae.b_mag)
    return torch.where(gate_pre > 0, magnitude, torch.zeros_like(magnitude)), torch.relu(gate_pre)


def test_gated_aux_loss_trains_only_the_gate_path():
    trainer = make_trainer("GatedSAETrainer")
    with torch.no_grad():
        trainer.ae.load_state_dict(gated_with_random_biases().state_dict())
    ae, x = trainer.ae, random_batches(1)[0]
    _, _, _, aux_loss = trainer.loss_terms(x)
    aux_loss.backward()
    for frozen in (ae.W_dec, ae.r_mag, ae.b_mag):
        assert frozen.grad is None or not frozen.grad.any()
    assert ae.W_enc.grad.T.abs().sum() > 0 and ae.b_gate.grad.abs().sum() > 0
    # b_dec reaches the aux loss only through the input centering x − b_dec of the gate (the
    # paper's pseudo-code); its use in the reconstruction is frozen
    b = ae.b_dec
    gate = torch.relu((x - b) @ ae.W_enc + ae.b_gate)
    x_hat_gate = gate @ ae.W_dec.T.detach().T
    (frozen_grad,) = torch.autograd.grad((x - x_hat_gate - b.detach()).pow(2).sum(-1).mean(), b, retain_graph=True)
    (unfrozen_grad,) = torch.autograd.grad((x - x_hat_gate - b).pow(2).sum(-1).mean(), b)
    torch.testing.assert_close(b.grad, frozen_grad)
    assert not torch.allclose(frozen_grad, unfrozen_grad, atol=1e-3)
    # while the reconstruction term does train the decoder and the magnitude path
    ae.zero_grad()
    _, _, recon_loss, _ = trainer.loss_terms(x)
    recon_loss.backward()
    assert ae.W_dec.grad.T.abs().sum() > 0 and ae.r_mag.grad.abs().sum() > 0


def test_gated_optimizer_is_constrained_adam_with_paper_betas():
    trainer = make_trainer("GatedSAETrainer", lr=1e-2)
    assert isinstance(trainer.optimizer, ConstrainedAdam)
    assert trainer.optimizer.param_groups[0]["betas"] == (0.0, 0.999)
    for step, x in enumerate(random_batches(10)):
        trainer.update(step, x)
    torch.testing.assert_close(trainer.ae.W_dec.T.norm(dim=0), torch.ones(F))


# --- p-annealing --------------------------------------------------------------------------------


def test_p_anneal_at_p_1_is_the_standard_recipe():
    from dictionary_learning.trainers.standard import StandardTrainer, StandardTrainerConfig

    annealed = make_trainer("PAnnealTrainer", steps=20, anneal_start=10, sparsity_penalty=0.2, lr=1e-2)
    standard = StandardTrainer(StandardTrainerConfig(D, F, lr=1e-2, warmup_steps=2, seed=0, sparsity_penalty=0.2))
    for step, x in enumerate(random_batches(10)):
        a, s = annealed.update(step, x), standard.update(step, x)
        assert float(a["loss"]) == pytest.approx(float(s["loss"]), rel=1e-6)
    for key, value in standard.ae.state_dict().items():
        torch.testing.assert_close(annealed.ae.state_dict()[key], value)


@pytest.mark.parametrize("name", ["PAnnealTrainer", "GatedAnnealTrainer"])
def test_p_follows_the_schedule(name):
    trainer = make_trainer(name, steps=20)
    used = [float(trainer.update(step, x)["p"]) for step, x in enumerate(random_batches(20))]
    change_steps = [4, 8, 12, 16]
    expected = [1 - 0.8 * sum(t < s for t in change_steps) / 4 for s in range(20)]
    assert used == pytest.approx(expected)
    assert trainer.p == pytest.approx(0.2)


@pytest.mark.parametrize("name", ["PAnnealTrainer", "GatedAnnealTrainer"])
def test_penalty_is_continuous_when_p_changes(name):
    # lr = 0 (set on the trainer: a config refuses it): the weights stay put, so the same batch gives
    # the same features before and after
    trainer = make_trainer(name, steps=20, sparsity_queue_length=1)
    trainer.lr = 0.0
    x = random_batches(1)[0].abs() * 0.5
    for step in range(4):
        trainer.update(step, random_batches(1, seed=step + 1)[0])
    before = trainer.update(4, x)  # the first change of p happens after this step
    after = trainer.loss(x, 5).metrics
    assert float(before["p"]) == 1.0 and float(after["p"]) == pytest.approx(0.8)
    assert abs(float(after["sparsity_coeff"]) / float(before["sparsity_coeff"]) - 1) > 0.05
    torch.testing.assert_close(
        after["sparsity_coeff"] * after["sparsity_loss"], before["sparsity_coeff"] * before["sparsity_loss"]
    )


def test_penalty_rescale_averages_the_queue():
    trainer = make_trainer("PAnnealTrainer", steps=20, sparsity_queue_length=3)
    batches = random_batches(5)
    metrics = [trainer.update(step, x) for step, x in enumerate(batches)]
    assert "sparsity_loss_next_p" not in metrics[1]  # measured only in the window before a change
    window = metrics[2:5]
    old = torch.stack([m["sparsity_loss"] for m in window]).mean()
    new = torch.stack([m["sparsity_loss_next_p"] for m in window]).mean()
    assert trainer.sparsity_coeff == pytest.approx(0.1 * (old / new).item())


@pytest.mark.parametrize("name", ["PAnnealTrainer", "GatedAnnealTrainer"])
def test_resume_from_state_dict_is_exact(name):
    batches = random_batches(14)
    straight = make_trainer(name, steps=20, sparsity_queue_length=3)
    for step, x in enumerate(batches):
        straight.update(step, x)
    first = make_trainer(name, steps=20, sparsity_queue_length=3)
    for step, x in enumerate(batches[:7]):  # stops inside a measuring window
        first.update(step, x)
    resumed = make_trainer(name, steps=20, sparsity_queue_length=3, seed=1)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for step, x in enumerate(batches[7:], start=7):
        resumed.update(step, x)
    for key, value in straight.ae.state_dict().items():
        assert torch.equal(value, resumed.ae.state_dict()[key]), key
    assert resumed.sparsity_coeff == straight.sparsity_coeff and resumed.p == straight.p


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(p_end=0.0), "p_end"),
        (dict(anneal_start=20), "anneal_start"),
        (dict(n_sparsity_updates=17), "n_sparsity_updates"),
        (dict(n_sparsity_updates="continuous"), "n_sparsity_updates"),
        (dict(sparsity_function="L0"), "sparsity_function"),
        (dict(sparsity_queue_length=0), "sparsity_queue_length"),
    ],
)
def test_anneal_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trainer("PAnnealTrainer", steps=20, **kwargs)


def test_anneal_needs_the_run_length():
    with pytest.raises(ValueError, match="steps"):
        make_trainer("GatedAnnealTrainer", steps=None)


# --- resampling ---------------------------------------------------------------------------------

RESAMPLING = ["GatedSAETrainer", "PAnnealTrainer", "GatedAnnealTrainer"]


def per_latent_params(trainer):
    ae = trainer.ae
    if isinstance(ae, GatedAutoEncoder):
        return [ae.b_gate, ae.b_mag, ae.r_mag]
    return [ae.b_enc]


@pytest.mark.parametrize("name", RESAMPLING)
def test_resampling_revives_latents_that_never_fire(name):
    trainer = make_trainer(name, resample_steps=5, lr=1e-2)
    never_fire = torch.tensor([2, 9, 33])
    with torch.no_grad():
        per_latent_params(trainer)[0][never_fire] = -1e4
    batches = random_batches(5)
    for step, x in enumerate(batches[:4]):
        trainer.update(step, x)
        assert (trainer.ae.encode(x)[:, never_fire] == 0).all()
    trainer.update(4, batches[4])  # resamples after this step
    ae = trainer.ae
    for p in per_latent_params(trainer):
        assert torch.equal(p[never_fire], torch.zeros(3))
    columns = ae.W_dec.T[:, never_fire].T  # unit inputs of the last batch
    torch.testing.assert_close(columns.norm(dim=-1), torch.ones(3))
    unit_inputs = batches[4] / batches[4].norm(dim=-1, keepdim=True)
    assert ((columns @ unit_inputs.T).max(dim=-1).values - 1).abs().max() < 1e-5
    rows = ae.W_enc.T[never_fire]
    torch.testing.assert_close(rows / rows.norm(dim=-1, keepdim=True), columns)
    assert (trainer.dead_tracker.steps_since_fired[never_fire] == 0).all()
    assert (ae.encode(batches[4])[:, never_fire] > 0).any()  # they fire again


@pytest.mark.parametrize("name", RESAMPLING)
def test_resampling_resets_adam_state_of_exactly_the_dead_latents(name):
    trainer = make_trainer(name, lr=1e-2)
    for step, x in enumerate(random_batches(5)):
        trainer.update(step, x)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[1, 5, 17, 40]] = True
    live = ~dead
    ae, state = trainer.ae, trainer.optimizer.state
    weights_before = {k: v.clone() for k, v in ae.state_dict().items()}
    params = [(ae.W_enc, 1), (ae.W_dec, 0)] + [(p, 0) for p in per_latent_params(trainer)]  # the latent's index
    state_before = {p: {k: state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p, _ in params}
    resampled = trainer.resample_neurons(dead, random_batches(1, seed=9)[0])
    assert sorted(resampled.tolist()) == [1, 5, 17, 40]
    for p, dim in params:
        for key in ("exp_avg", "exp_avg_sq"):
            now, then = state[p][key], state_before[p][key]
            assert not now.index_select(dim, resampled).any()
            assert then.index_select(dim, resampled).abs().sum() > 0
            live_index = live.nonzero().squeeze(-1)
            assert torch.equal(now.index_select(dim, live_index), then.index_select(dim, live_index))
    assert torch.equal(ae.W_enc.T[live], weights_before["encoder.weight"][live])
    assert torch.equal(ae.W_dec.T[:, live], weights_before["decoder.weight"][:, live])
    assert not torch.isclose(ae.W_enc.T[dead], weights_before["encoder.weight"][dead]).all(dim=-1).any()


# --- every recipe ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_loss_does_not_change_training_state(name):
    trainer = make_trainer(name, resample_steps=3) if name in RESAMPLING else make_trainer(name)
    for step, x in enumerate(random_batches(3)):
        trainer.update(step, x)
    before = copy.deepcopy(trainer.state_dict())
    for step in (3, 4, 5):  # inside the measuring window of p-annealing
        first = trainer.loss(random_batches(1)[0], step)
        second = trainer.loss(random_batches(1)[0], step)
        torch.testing.assert_close(first.loss, second.loss, rtol=0, atol=0)
    after = trainer.state_dict()
    for key in ("ae", "dead_tracker"):
        for k, v in before[key].items():
            assert torch.equal(v, after[key][k]), (key, k)
    assert repr(before["extra"]) == repr(after["extra"])


@pytest.mark.parametrize("name", RECIPES)
def test_update_accepts_3d_batches(name):
    def train(shape):
        trainer = make_trainer(name, resample_steps=2) if name in RESAMPLING else make_trainer(name)
        torch.manual_seed(0)  # the resampling draws
        losses = [trainer.update(step, x.reshape(shape)) for step, x in enumerate(random_batches(5))]
        return trainer, [float(m["loss"]) for m in losses]

    flat, flat_losses = train((32, D))
    tokens, token_losses = train((4, 8, D))
    assert token_losses == pytest.approx(flat_losses, rel=1e-5)
    for key, value in flat.ae.state_dict().items():
        torch.testing.assert_close(tokens.ae.state_dict()[key], value)


@pytest.mark.parametrize("name", RECIPES)
def test_trainSAE_runs_recipe_and_saves_loadable_dictionary(name, tmp_path):
    config = dict(trainer=name, activation_dim=D, dict_size=F, warmup_steps=2, seed=0)
    if "Anneal" in name:
        config.update(ANNEAL, anneal_start=2, n_sparsity_updates=2)
    (ae,) = trainSAE(random_batches(6), trainer_configs=[config], steps=6, save_dir=tmp_path, progress=False)
    run = tmp_path / "trainer_0"
    saved = json.loads((run / "config.json").read_text())["trainer"]
    assert saved["trainer_class"] == name
    dict_class = GatedAutoEncoder if "Gated" in name else AutoEncoder
    assert isinstance(ae, dict_class) and saved["dict_class"] == dict_class.__name__
    loaded = dict_class.from_pretrained(run / "ae.pt")
    x = random_batches(1)[0]
    assert torch.equal(loaded(x), ae(x))
    rebuilt = build_trainer(saved)  # the saved config builds the same recipe again
    assert type(rebuilt).__name__ == name


# --- learning the synthetic ground truth -----------------------------------------------------------
# One fixed CPU budget for every recipe: D=64, 512 true features (~5 active per sample, Zipf
# frequencies), F=512 latents, batches of 256, 500 steps.

SYN_D, SYN_TRUE, SYN_F, SYN_B, SYN_STEPS = 64, 512, 512, 256, 500
ANNEAL_SYN = dict(anneal_start=250, n_sparsity_updates=4, p_end=0.5)
SYN_CONFIGS = {
    "StandardTrainerAprilUpdate": dict(sparsity_penalty=0.6, lr=1e-2),
    "GatedSAETrainer": dict(sparsity_penalty=1.0, lr=1e-2),
    "PAnnealTrainer": dict(sparsity_penalty=0.3, lr=3e-2, **ANNEAL_SYN),
    "GatedAnnealTrainer": dict(sparsity_penalty=0.7, lr=1e-2, **ANNEAL_SYN),
}
# The gated recipes start from W_gate = 0.1 W_decᵀ: Adam moves each weight by about the LR, so the
# 6e-2 that suited the tied W_gate = W_decᵀ (entries ~0.1) is several times a gate entry (~0.01) now
# and leaves 99% of the latents dead; 1e-2 is the largest of 6e-2 / 1e-2 / 3e-3 that learns.
# Measured at this budget (torch 2.13, CPU), trained / untrained dictionary:
#   recipe                      L0    FVU    MMCS   dead     untrained MMCS
#   StandardTrainerAprilUpdate  11.5  0.263  0.763  6.6%     0.372
#   GatedSAETrainer              6.6  0.203  0.686  17.6%    0.372
#   PAnnealTrainer               6.1  0.284  0.710  31.8%    0.369   (0.468 with W_enc = W_decᵀ)
#   GatedAnnealTrainer           6.0  0.217  0.683  38.7%    0.372
MIN_MMCS = {
    "StandardTrainerAprilUpdate": 0.70, "GatedSAETrainer": 0.55, "PAnnealTrainer": 0.65, "GatedAnnealTrainer": 0.55
}
MAX_FVU = {
    "StandardTrainerAprilUpdate": 0.32, "GatedSAETrainer": 0.40, "PAnnealTrainer": 0.35, "GatedAnnealTrainer": 0.40
}


def dictionary_quality(ae, data):
    x = data.sample(4096)
    with torch.no_grad():
        x_hat, f = ae(x, output_features=True)
    return {
        "L0": (f != 0).float().sum(-1).mean().item(),
        "FVU": ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
        "MMCS": mean_max_cosine_similarity(ae, data.true_features),
        "dead": ((f != 0).sum(0) == 0).float().mean().item(),
    }


@pytest.fixture(scope="module", params=RECIPES)
def trained_on_synthetic(request):
    name = request.param
    make_data = lambda stream_seed: SyntheticActivations(  # noqa: E731
        activation_dim=SYN_D, n_features=SYN_TRUE, mean_active=5, batch_size=SYN_B, seed=0, stream_seed=stream_seed
    )
    train, held_out = make_data(0), make_data(123)
    config = dict(trainer=name, activation_dim=SYN_D, dict_size=SYN_F, warmup_steps=50, seed=0, **SYN_CONFIGS[name])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is as fast, and far faster on a busy machine
    try:
        trainer = build_trainer(config, steps=SYN_STEPS)
        untrained = dictionary_quality(trainer.ae, held_out)
        mse = [float(trainer.update(step, train.sample())["mse_loss"]) for step in range(SYN_STEPS)]
        quality = dictionary_quality(trainer.ae, held_out)
    finally:
        torch.set_num_threads(threads)
    return name, trainer, mse, untrained, quality


@pytest.mark.slow
def test_training_lowers_the_reconstruction_loss(trained_on_synthetic):
    name, _, mse, _, _ = trained_on_synthetic
    # p-annealing starts from W_enc = 0.1 W_decᵀ, so its first MSE is about E‖x‖² (f ≈ 0) rather than
    # the overshoot of a unit-norm encoder, and the annealed penalty then trades MSE for L0
    drop = 0.7 if name == "PAnnealTrainer" else 0.5
    assert sum(mse[-20:]) / 20 < drop * sum(mse[:5]) / 5


@pytest.mark.slow
def test_learns_the_true_features(trained_on_synthetic):
    name, _, _, untrained, quality = trained_on_synthetic
    assert untrained["MMCS"] < 0.4
    assert quality["MMCS"] >= max(MIN_MMCS[name], untrained["MMCS"] + 0.08)
    assert quality["FVU"] <= MAX_FVU[name]
    assert 2 <= quality["L0"] <= 15  # ~5 true features per sample


@pytest.mark.slow
def test_decoder_norms_after_training(trained_on_synthetic):
    name, trainer, _, _, _ = trained_on_synthetic
    norms = trainer.ae.W_dec.T.norm(dim=0)
    if name == "StandardTrainerAprilUpdate":
        assert norms.std() > 0.01  # free norms: they carry the features' scale
    else:
        torch.testing.assert_close(norms, torch.ones_like(norms))
