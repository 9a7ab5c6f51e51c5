"""Feature dashboards (feature_stats.py, dashboards.py): the streaming statistics equal a brute-force
computation on all tokens at once, the densities equal evaluate()'s bookkeeping, the logit effects
follow their formula, the statistics file round-trips, and the HTML works in a real browser
(headless Chromium, driven over the DevTools protocol by scripts/chromium.py)."""
import json
import math
import os
import re

import pytest
import torch

from dictionary_learning import (ActivationBuffer, AutoEncoder, FeatureStats, collect_features, dashboard, evaluate,
                                 render_dashboard)
from dictionary_learning.feature_stats import (FeatureCollector, dense_to_codes, descending_rank, final_norm, flat_nonzero,
                                              logit_effects)
from dictionary_learning.kernels import SparseCodes

from lm_fixtures import documents, fresh_tokenizer, tiny_gpt2, tiny_gpt_neox

MLP1 = "gpt_neox.layers.1.mlp"


# --------------------------------------------------------------------------------------------
# The streaming pass against brute force
# --------------------------------------------------------------------------------------------


def random_batches(seed=0, n_latents=23, ties=False):
    """Batches of sparse features [B, T, F] of different lengths, with padding (`real` false) and a
    position that does not count (`keep` false). With `ties`, values are multiples of 0.5, so
    many are equal."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(n_latents, generator=generator) * 2)
    batches = []
    for index in range(6):
        batch, length = 3, 7 + 2 * index
        values = torch.rand(batch, length, n_latents, generator=generator) * scales
        if ties:
            values = (values * 4).ceil() / 2
        features = values * (torch.rand(batch, length, n_latents, generator=generator) < 0.25)
        features[:, :, 0] = 0  # a latent that never fires
        token_ids = torch.randint(0, 50, (batch, length), generator=generator)
        real = torch.ones(batch, length, dtype=torch.bool)
        real[0, :3] = False  # left padding
        keep = real.clone()
        keep[1, 0] = False  # e.g. a removed BOS: shown in contexts, not counted
        features[0, :3] = torch.rand(3, n_latents, generator=generator)  # padding holds garbage
        batches.append((features, token_ids, keep, real))
    return batches


def brute_force(batches, context):
    """Every counted token's features [N, F], and its context window (ids [W], features [W, F])."""
    rows, window_ids, window_features = [], [], []
    for features, token_ids, keep, real in batches:
        counted = features * keep[..., None]
        batch, length, _ = features.shape
        for b in range(batch):
            for t in range(length):
                if not keep[b, t]:
                    continue
                rows.append(counted[b, t])
                ids = torch.full((2 * context + 1,), -1)
                window = torch.zeros(2 * context + 1, features.shape[-1])
                for offset in range(-context, context + 1):
                    if 0 <= t + offset < length:
                        window[offset + context] = counted[b, t + offset]
                        if real[b, t + offset]:
                            ids[offset + context] = token_ids[b, t + offset]
                window_ids.append(ids)
                window_features.append(window)
    return torch.stack(rows), window_ids, window_features


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_streaming_statistics_equal_brute_force(ties):
    k, samples, context, n_bins = 4, 5, 3, 8
    batches = random_batches(ties=ties)
    collector = FeatureCollector(23, top_k=k, n_samples=samples, context=context, n_bins=n_bins, seed=3)
    for index, (features, token_ids, keep, real) in enumerate(batches):
        if index % 2:  # the same batch given as sparse codes
            features = dense_to_codes(features.reshape(-1, 23))
        collector.update(features, token_ids, keep, real)
    stats = collector.result()
    everything, window_ids, window_features = brute_force(batches, context)
    assert stats.n_tokens == len(everything)
    fired = everything != 0
    assert torch.equal(stats.fire_count, fired.sum(0))
    torch.testing.assert_close(stats.value_sum, everything.double().sum(0))
    assert torch.equal(stats.value_max, torch.where(fired.any(0), everything.max(0).values, 0))
    assert stats.fire_count[0] == 0 and stats.top["tokens"][0].eq(-1).all() and stats.samples["tokens"][0].eq(-1).all()
    for latent in range(23):
        tokens = fired[:, latent].nonzero().squeeze(1).tolist()
        # top k: largest value first, the earlier token first on ties
        expected = sorted(tokens, key=lambda n: (-everything[n, latent].item(), n))[:k]
        got = stats.top["tokens"][latent]
        assert got[got >= 0].tolist() == expected, latent
        for slot, n in enumerate(expected):
            assert stats.top["values"][latent, slot] == everything[n, latent]
            assert torch.equal(stats.top["window_ids"][latent, slot].long(), window_ids[n])
            assert torch.equal(stats.top["window_values"][latent, slot], window_features[n][:, latent])
        # samples: distinct firing tokens, all of them when there are at most `samples`, windows right
        drawn = stats.samples["tokens"][latent]
        drawn = drawn[drawn >= 0].tolist()
        assert len(set(drawn)) == len(drawn) == min(samples, len(tokens)) and set(drawn) <= set(tokens)
        for slot, n in enumerate(drawn):
            assert stats.samples["values"][latent, slot] == everything[n, latent]
            assert torch.equal(stats.samples["window_values"][latent, slot], window_features[n][:, latent])
        # the histogram: n_bins equal bins over [0, 2^e), e the smallest with max |f| < 2^e
        if tokens:
            _, exponent = torch.frexp(everything[tokens, latent].abs().max())
            bins = (everything[tokens, latent].abs() / 2.0 ** exponent.item() * n_bins).floor().long()
            assert stats.histogram_exponent[latent] == exponent
            assert torch.equal(stats.histogram[latent], torch.bincount(bins, minlength=n_bins))


def test_samples_are_uniform_and_seeded():
    """Latent 1 fires on all 600 tokens; over 200 seeds, each token is drawn 200·4/600 times on
    average, and the first and second half of the stream equally often."""
    token_ids = torch.zeros(6, 100, dtype=torch.long)
    keep = torch.ones(6, 100, dtype=torch.bool)
    features = torch.zeros(6, 100, 2)
    features[..., 1] = torch.rand(6, 100, generator=torch.Generator().manual_seed(0)) + 0.1
    counts = torch.zeros(600)
    for seed in range(200):
        collector = FeatureCollector(2, top_k=1, n_samples=4, context=0, seed=seed)
        for start in range(0, 6, 2):
            collector.update(features[start:start + 2], token_ids[start:start + 2], keep[start:start + 2])
        counts[collector.result().samples["tokens"][1]] += 1
    assert counts.sum() == 800 and counts[:300].sum().item() == pytest.approx(400, abs=60)
    first = FeatureCollector(2, n_samples=4, seed=5).update(features, token_ids, keep).result()
    second = FeatureCollector(2, n_samples=4, seed=5).update(features, token_ids, keep).result()
    assert torch.equal(first.samples["tokens"], second.samples["tokens"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_flat_nonzero_equals_nonzero(dtype):
    generator = torch.Generator().manual_seed(1)
    for size in (0, 1, 7, 64, 1001):
        values = torch.randn(size, generator=generator) * (torch.rand(size, generator=generator) < 0.1)
        values = values.to(dtype)
        if size > 3:
            values[3] = -0.0  # zero, though its bits are not
        assert torch.equal(flat_nonzero(values), values.nonzero().squeeze(1))
        if size > 1:
            assert torch.equal(flat_nonzero(values[1:]), values[1:].nonzero().squeeze(1))  # unaligned view


@pytest.mark.parametrize("n_latents", [16, 23])  # a power of two (shifts) and not (divisions)
def test_dense_to_codes_lists_the_nonzeros_in_row_major_order(n_latents):
    generator = torch.Generator().manual_seed(2)
    features = torch.relu(torch.randn(37, n_latents, generator=generator) - 1.0)
    codes = dense_to_codes(features)
    rows, columns = features.nonzero(as_tuple=True)
    assert codes.n_rows == 37
    assert torch.equal(codes.rows, rows) and torch.equal(codes.columns, columns)
    assert torch.equal(codes.values, features[rows, columns])


def test_descending_rank_orders_floats_from_largest():
    keys = torch.tensor([0.5, -2.0, math.inf, 0.0, -math.inf, 3e-39, -3e-39, 1.0, -0.5, 1e30, -1e30])
    rank = descending_rank(keys)
    assert torch.equal(keys[rank.argsort()], keys.sort(descending=True).values)
    assert bool((rank >= 0).all()) and bool((rank < 2**32).all())
    assert descending_rank(torch.tensor([0.0]))[0] < descending_rank(torch.tensor([-0.0]))[0]


def test_collector_rejects_bad_input():
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        FeatureCollector(8, top_k=-1)
    collector = FeatureCollector(8)
    with pytest.raises(ValueError, match=r"features must be \[2, 3, 8\]"):
        collector.update(torch.zeros(2, 3, 9), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="keep must be"):
        collector.update(torch.zeros(2, 3, 8), torch.zeros(2, 3, dtype=torch.long), torch.ones(3, 2))
    with pytest.raises(ValueError, match="the codes have 5 rows"):
        collector.update(SparseCodes(torch.ones(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 5),
                         torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))


# --------------------------------------------------------------------------------------------
# On a model: densities against evaluate(), logit effects, the saved file
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    return tiny_gpt_neox(init_std=0.3)


@pytest.fixture(scope="module")
def tokenizer():
    return fresh_tokenizer()


def sparse_autoencoder(hf, tokenizer, dict_size=96, seed=0, density=0.05):
    """A random AutoEncoder of the MLP output whose latents fire on about `density` of tokens (each
    encoder bias set at a quantile of its pre-activations), so that top contexts are selective."""
    ae = AutoEncoder(32, dict_size, generator=torch.Generator().manual_seed(seed))
    buffer = ActivationBuffer(iter(documents(40, seed=9)), hf, MLP1, tokenizer=tokenizer, n_ctxs=40, ctx_len=32,
                              refresh_batch_size=20, out_batch_size=256, seed=0)
    x = torch.cat(list(buffer))
    with torch.no_grad():
        pre = (x - ae.b_dec) @ ae.W_enc
        ae.b_enc.copy_(-pre.quantile(1 - density, dim=0))
        ae.b_enc[:4] = -1e3  # dead latents
    return ae


@pytest.fixture(scope="module")
def ae(hf, tokenizer):
    return sparse_autoencoder(hf, tokenizer)


def test_densities_equal_evaluate_bookkeeping(hf, tokenizer, ae):
    """Same texts, same forward batches: fire counts / N are evaluate()'s alive fraction and L0."""
    texts = documents(30, seed=4)
    stats = collect_features(ae, iter(texts), hf, MLP1, n_tokens=10**6, tokenizer=tokenizer, ctx_len=24,
                             batch_size=8, progress=False)
    buffer = ActivationBuffer(iter(texts), hf, MLP1, tokenizer=tokenizer, n_ctxs=64, ctx_len=24, refresh_batch_size=8,
                              out_batch_size=128, seed=0)
    with pytest.warns(UserWarning, match="frac_alive was measured over only"):
        metrics = evaluate(ae, buffer, n_batches=1000)
    assert stats.n_tokens == metrics["tokens"] > 500
    assert (stats.fire_count > 0).sum().item() == round(metrics["frac_alive"] * ae.dict_size)  # same latents alive
    assert stats.density.sum().item() == pytest.approx(metrics["l0"], rel=1e-12)
    assert 0 < metrics["frac_alive"] < 1  # dead latents and live ones
    # n_tokens cuts the stream at exactly that many tokens
    assert collect_features(ae, iter(texts), hf, MLP1, n_tokens=77, tokenizer=tokenizer, ctx_len=24, batch_size=8,
                            progress=False).n_tokens == 77


def test_logit_effects_follow_the_final_norm_and_unembedding(hf, ae):
    norm, unembedding = final_norm(hf)
    assert norm is hf.gpt_neox.final_layer_norm and unembedding is hf.get_output_embeddings()
    effects = logit_effects(ae, hf, n=5)
    with torch.no_grad():
        d = ae.W_dec  # [F, D]
        centred = d - d.mean(-1, keepdim=True)
        normed = centred / (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * norm.weight
        logits = normed @ hf.get_output_embeddings().weight.T
    top = logits.topk(5, dim=1)
    assert torch.equal(effects["promoted_ids"], top.indices)
    torch.testing.assert_close(effects["promoted_values"], top.values, rtol=1e-4, atol=1e-4)
    assert torch.equal(effects["suppressed_ids"], logits.topk(5, dim=1, largest=False).indices)
    gpt2 = tiny_gpt2()
    assert final_norm(gpt2)[0] is gpt2.transformer.ln_f
    assert logit_effects(AutoEncoder(64, 8), hf) is None  # not the residual stream's width


def test_statistics_file_round_trips_and_rebuilds_the_same_html(hf, tokenizer, ae, tmp_path):
    index = dashboard(ae, iter(documents(20, seed=5)), hf, MLP1, tmp_path / "a", n_tokens=400, tokenizer=tokenizer,
                      ctx_len=24, batch_size=8, chunk_size=32, progress=False)
    assert index == tmp_path / "a" / "index.html"
    stats = FeatureStats.load(tmp_path / "a" / "features.pt")
    assert stats.n_tokens == 400 and stats.meta["site"] == MLP1 and stats.logits is not None
    assert set(stats.vocab) == set(stats.used_token_ids().tolist())
    render_dashboard(tmp_path / "a" / "features.pt", tmp_path / "b", chunk_size=32)
    files = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").rglob("*") if path.is_file())
    assert len(files) == 1 + 3 + 4 + 3  # features.pt, 3 pages/assets + index.html, meta/vocab/index, 96/32 chunks
    for path in files:
        if path.name != "features.pt":
            assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path
    render_dashboard(stats, tmp_path / "a", chunk_size=64)  # fewer chunks: the stale one goes
    assert sorted(p.name for p in (tmp_path / "a" / "data" / "latents").iterdir()) == ["00000.js", "00001.js"]
    torch.save({"not": "stats"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a feature-statistics file"):
        FeatureStats.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="pass model= and site="):
        dashboard(ae, iter(["text"]), None, None, tmp_path / "c")
    with pytest.raises(ValueError, match="n_tokens must be a positive int"):
        collect_features(ae, iter(["text"]), hf, MLP1, n_tokens=0, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------
# The HTML in headless Chromium
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(load_script):
    chromium = load_script("chromium")
    if chromium.chromium_binary() is None:
        if os.environ.get("DL_REQUIRE_BROWSER") == "1":
            pytest.fail("DL_REQUIRE_BROWSER=1 but no chromium is installed (apt-get install chromium)")
        pytest.skip("no chromium executable (apt-get install chromium); .ci/run installs it")
    with chromium.Browser() as browser:
        yield browser


@pytest.fixture(scope="module")
def site(hf, tokenizer, ae, tmp_path_factory):
    out = tmp_path_factory.mktemp("dashboard")
    dashboard(ae, iter(documents(60, seed=6)), hf, MLP1, out, n_tokens=1500, tokenizer=tokenizer, ctx_len=32,
              batch_size=16, chunk_size=40, title="Tiny <dashboard>", progress=False)
    return out, FeatureStats.load(out / "features.pt")


def test_index_page_lists_sorts_and_filters_latents(browser, site, tmp_path):
    out, stats = site
    page = browser.open(out / "index.html")
    page.wait_until("document.body.dataset.ready")
    assert page.errors == []
    assert page.evaluate("document.title") == "Tiny <dashboard>"  # escaped into the page, shown as text
    bars = page.evaluate("[...document.querySelectorAll('#density-svg rect.bar')].map(r => +r.dataset.count)")
    assert bars[0] == int((stats.fire_count == 0).sum()) == 4 and sum(bars) == stats.dict_size
    rows = "[...document.querySelectorAll('#latents tbody tr')].map(r => [+r.dataset.latent, " \
           "[...r.cells].map(c => c.textContent)])"
    shown = page.evaluate(rows)
    assert [latent for latent, _ in shown] == list(range(stats.dict_size))  # 96 latents fit one page of 100
    latent = int(stats.fire_count.argmax())
    cells = dict(shown)[latent]
    assert float(cells[1]) == pytest.approx(stats.density[latent].item(), rel=2e-3)
    centre = stats.top["window_ids"][latent, 0, stats.meta["context"]].item()
    assert cells[5].startswith(stats.vocab[centre].replace(" ", "\u00b7"))  # its strongest token first
    page.evaluate("document.querySelector('th[data-key=density]').click()")  # sort: densest first
    order = [latent for latent, _ in page.evaluate(rows)]
    assert order == sorted(range(stats.dict_size), key=lambda i: (-stats.density[i].item(), i))
    page.evaluate("document.getElementById('filter-dead').click()")
    assert len(page.evaluate(rows)) == int((stats.fire_count > 0).sum())
    dead_bar = "document.querySelector('#density-svg rect.bar.dead').dispatchEvent(new MouseEvent('click'))"
    page.evaluate(dead_bar)
    assert sorted(latent for latent, _ in page.evaluate(rows)) == [0, 1, 2, 3]
    text = stats.vocab[centre].strip() or stats.vocab[centre]
    page.evaluate(f"const f = document.getElementById('filter-text'); document.getElementById('clear-filter').click(); "
                  f"f.value = {json.dumps(text)}; f.dispatchEvent(new Event('input'))")
    matching = page.evaluate(rows)
    assert latent in [i for i, _ in matching] and 0 < len(matching) < stats.dict_size
    assert all(text.lower() in (c[5] + c[6]).replace("\u00b7", " ").lower() for _, c in matching)
    page.screenshot(tmp_path / "index.png")
    assert (tmp_path / "index.png").stat().st_size > 10_000


def test_latent_page_shows_contexts_shaded_by_activation(browser, site, tmp_path):
    out, stats = site
    latent = int(stats.fire_count.argmax())
    page = browser.open(out / "latent.html", fragment=str(latent))
    page.wait_until(f"document.body.dataset.ready === '{latent}'")
    assert page.errors == []
    contexts = page.evaluate("""[...document.querySelectorAll('#top-activations .ctx')].map(row => ({
        value: row.querySelector('.val').textContent,
        tokens: [...row.querySelectorAll('.tok')].map(t => [t.textContent, t.dataset.v, t.title,
                 t.classList.contains('centre'), getComputedStyle(t).backgroundColor])}))""")
    filled = int((stats.top["tokens"][latent] >= 0).sum())
    assert len(contexts) == filled == stats.top["tokens"].shape[1]
    for slot, row in enumerate(contexts):
        value = stats.top["values"][latent, slot].item()
        assert float(row["value"]) == pytest.approx(value, rel=2e-3)
        ids = [i for i in stats.top["window_ids"][latent, slot].tolist() if i >= 0]
        assert [t[0] for t in row["tokens"]] == [stats.vocab[i].replace("\n", "\u21b5") for i in ids]
        centre = [t for t in row["tokens"] if t[3]]
        assert len(centre) == 1 and float(centre[0][1]) == pytest.approx(value, rel=2e-3)
        assert centre[0][2].endswith(centre[0][1])  # hover (title) shows the value
        # shading: the strongest token is the darkest; tokens where the latent is 0 are not shaded
        alphas = [float(re.findall(r"[\d.]+", t[4])[3]) if t[4].startswith("rgba") else 0.0 for t in row["tokens"]]
        values = [float(t[1]) for t in row["tokens"]]
        assert max(alphas) == alphas[values.index(max(values))] > 0.5
        assert all((alpha == 0) == (v == 0) for alpha, v in zip(alphas, values))
    strongest = next(t for t in contexts[0]["tokens"] if t[3])  # the latent's maximum: full shade
    assert strongest[4] == "rgba(255, 110, 0, 0.9)"
    samples = page.evaluate("document.querySelectorAll('#quantile-samples .ctx').length")
    assert samples == int((stats.samples["tokens"][latent] >= 0).sum()) > 0
    assert page.evaluate("document.querySelectorAll('#activation-histogram rect').length") > 0
    promoted = page.evaluate("[...document.querySelectorAll('#logit-effects .pos')].map(c => +c.textContent)")
    assert promoted == pytest.approx(stats.logits["promoted_values"][latent].tolist(), rel=2e-3, abs=1e-3)
    page.screenshot(tmp_path / "latent.png")
    # another chunk through the navigation; a dead latent says so
    page.evaluate("location.hash = '#1'")
    page.wait_until("document.body.dataset.ready === '1'")
    assert "never fired" in page.evaluate("document.getElementById('latent').textContent")
    page.evaluate(f"location.hash = '#{stats.dict_size - 1}'")
    page.wait_until(f"document.body.dataset.ready === '{stats.dict_size - 1}'")
    assert page.errors == []
    assert (tmp_path / "latent.png").stat().st_size > 10_000


def test_token_texts_show_the_bytes_of_partial_characters():
    from dictionary_learning import load_bundled_model
    from dictionary_learning.dashboards import token_texts

    tokenizer = load_bundled_model().tokenizer
    text = 'x = "€→"'
    ids = tokenizer.encode(text, add_special_tokens=False)
    texts = token_texts(tokenizer, ids)
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert len(partial) == 6  # '€' and '→' are 3 bytes each, one byte token per byte here
    assert all(re.fullmatch(r"(\\x[0-9a-f]{2})+", texts[i]) for i in partial)
    shown = "".join(texts[i] for i in ids)  # the bytes, in order, as escapes: the text's UTF-8
    assert shown.encode("latin-1").decode("unicode_escape").encode("latin-1").decode("utf-8") == text
    assert texts[ids[0]] == "x" and texts[ids[1]] == " ="  # whole characters decode as before
    (control,) = tokenizer.encode("\x1e", add_special_tokens=False)
    (newline,) = tokenizer.encode("\n", add_special_tokens=False)
    assert token_texts(tokenizer, [control, newline]) == {control: "\\x1e", newline: "\n"}  # not an empty box
