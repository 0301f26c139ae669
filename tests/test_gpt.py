"""The GPT of issue 15: sequence losses, positions, tied weights, the model, generation, data, CLI."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fbp import losses

# --------------------------------------------------------------------------- sequence losses

SEQUENCE_SHAPES = [(3, 5, 7), (2, 1, 4), (4, 6, 3, 11)]


def test_sequence_softmax_cross_entropy_matches_optax_in_one_program():
    """(..., classes) logits, labels of the leading shape, with and without a mask, in float64."""
    with jax.enable_x64(True):
        cases = []
        for seed, shape in enumerate(SEQUENCE_SHAPES):
            rng = np.random.default_rng(seed)
            logits = 4 * rng.standard_normal(shape)
            labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
            mask = rng.random(shape[:-1]) < 0.6
            mask[(0,) * (len(shape) - 1)] = True
            cases.append((logits, labels, mask))

        def optax_loss(z, labels, mask):
            per = optax.losses.softmax_cross_entropy_with_integer_labels(z, labels)
            return jnp.sum(per * mask) / jnp.sum(mask)

        @jax.jit
        def run(cases):
            out = []
            for z, labels, mask in cases:
                padded = jnp.where(mask, labels, -1)  # masked labels may be padding
                ones = jnp.ones_like(mask)
                out.append(
                    (
                        losses.softmax_cross_entropy.value(z, labels),
                        losses.softmax_cross_entropy.grad(z, labels),
                        jax.value_and_grad(optax_loss)(z, labels, ones),
                        losses.softmax_cross_entropy.value(z, (padded, mask)),
                        losses.softmax_cross_entropy.grad(z, (padded, mask)),
                        jax.value_and_grad(optax_loss)(z, labels, mask),
                        losses.softmax_cross_entropy.grad(z, jax.nn.one_hot(labels, z.shape[-1])),
                    )
                )
            return out

        for v, g, (rv, rg), mv, mg, (rmv, rmg), g_onehot in run(cases):
            np.testing.assert_allclose(v, rv, rtol=1e-12)
            np.testing.assert_allclose(g, rg, rtol=1e-10, atol=1e-15)
            np.testing.assert_allclose(mv, rmv, rtol=1e-12)
            np.testing.assert_allclose(mg, rmg, rtol=1e-10, atol=1e-15)
            np.testing.assert_allclose(g_onehot, rg, rtol=1e-10, atol=1e-15)
            assert np.isfinite(mv)


def test_sequence_loss_errors_name_the_shapes():
    z = jnp.zeros((2, 3, 5))
    with pytest.raises(
        ValueError, match=r"softmax_cross_entropy: expected integer labels of shape \(2, 3\)"
    ):
        losses.softmax_cross_entropy.value(z, jnp.zeros((6,), int))
    with pytest.raises(ValueError, match=r"expected a mask of shape \(2, 3\)"):
        losses.softmax_cross_entropy.value(z, (jnp.zeros((2, 3), int), jnp.ones((2,))))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        losses.softmax_cross_entropy.value(z, jnp.full((2, 3), 5))


# --------------------------------------------------------------------------- tied weights and the model

import fbp  # noqa: E402
from fbp import checkpoint, diagnostics, models, nn, verify  # noqa: E402
from fbp.errors import ConfigError, FbpError  # noqa: E402

VOCAB, CONTEXT = 13, 8


def _tiny(tied=True, **kw):
    """One block is enough for every property here (the tie spans the whole model); a second
    block would only make every program bigger to compile."""
    return models.gpt(VOCAB, CONTEXT, layers=1, heads=2, width=16, tied=tied, **kw)


def _batch(seed, batch=3, time=CONTEXT):
    """Next-id targets of random ids, drawn with numpy (no eager JAX, no compile)."""
    ids = np.random.default_rng(seed).integers(0, VOCAB, (batch, time + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def _params(model, seed):
    """Params of ``model.init``'s layout and dtypes, every value drawn from N(0, 0.3²) by numpy.

    No eager JAX (nothing compiles), and the layer norms are away from γ = 1, β = 0, so
    their gradients are not special.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), (CONTEXT,))[0])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def tied_float64():
    """``(params, results)``: the tied GPT's gradients in float64, fbp's and references, from
    ONE compiled program (the two tests below read it; a float64 GPT program is the slowest
    compile here, and the two share their forward passes).

    ``results``: fbp's value and gradient; ``jax.value_and_grad`` of the tied model; the
    autodiff gradient of the untied model at the same numbers (both uses of the table,
    independent of :func:`fbp.nn.tie`); fbp's per-example gradient norms and the norms of
    ``vmap(jax.grad)``'s per-example gradients.
    """
    loss = losses.softmax_cross_entropy
    with jax.enable_x64(True):
        tied, untied = _tiny(dtype=jnp.float64), _tiny(tied=False, dtype=jnp.float64)
        params = _params(tied, 1)
        x, y = _batch(2, batch=4)
        untied_params = (*params[:-1], params[0])  # the same numbers, two copies

        def one(p, x_n, y_n):
            return loss.value(tied.apply(p, x_n[None]), y_n[None])

        @jax.jit
        def run(params, untied_params, x, y):
            value, grads = fbp.value_and_grad(tied, loss)(params, x, y)
            ref_value, ref = jax.value_and_grad(lambda p: loss.value(tied.apply(p, x), y))(params)
            g_untied = jax.grad(lambda p: loss.value(untied.apply(p, x), y))(untied_params)
            _, _, norms = diagnostics.value_grad_and_norms(tied, loss)(params, x, y)
            per_example = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)
            squares = [jnp.sum(g.reshape(4, -1) ** 2, axis=1) for g in jax.tree.leaves(per_example)]
            return {
                "value": value, "grads": grads, "ref_value": ref_value, "ref": ref,
                "g_untied": g_untied, "norms": norms, "ref_norms": jnp.sqrt(sum(squares)),
            }  # fmt: skip

        return params, run(params, untied_params, x, y)


def test_tied_gpt_gradient_equals_jax_grad_and_the_sum_of_both_uses_in_float64(tied_float64):
    params, out = tied_float64
    assert params[-1] is None  # one table, stored once
    grads, ref, g_untied = out["grads"], out["ref"], out["g_untied"]
    np.testing.assert_allclose(out["value"], out["ref_value"], rtol=1e-12)
    assert grads[-1] is None and ref[-1] is None
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-14 * np.abs(r).max())
    both_uses = g_untied[0]["embedding"] + g_untied[-1]["embedding"]
    np.testing.assert_allclose(grads[0]["embedding"], both_uses, rtol=1e-10, atol=1e-16)
    # The head's use is a real share: dropping it would be a different gradient.
    assert np.abs(g_untied[-1]["embedding"]).max() > 1e-3 * np.abs(both_uses).max()


@pytest.mark.slow  # two float64 checks of a whole GPT: compile-bound, about a minute on 2 cores
def test_check_model_passes_on_the_tied_gpt_and_catches_a_head_that_drops_its_share():
    params = _params(_tiny(), 3)
    x, y = _batch(4, time=5)  # shorter than the context
    report = verify.check_model(_tiny(), losses.softmax_cross_entropy, params, x, y)
    assert report.ok, str(report)

    # A tie whose backward forgets the head's share of the table must fail.
    model = _tiny()
    inner = model.children[0]

    def forgetful_backward(p, cache, dy):
        dparams, dx = inner.backward((*p[:-1], p[0]), cache, dy)
        return (*dparams[:-1], None), dx

    broken = model._replace(backward=forgetful_backward)
    bad = verify.check_model(broken, losses.softmax_cross_entropy, params, x, y)
    assert not bad.ok


def test_per_example_norms_of_the_tied_gpt_equal_vmap_of_jax_grad(tied_float64):
    _, out = tied_float64
    assert out["norms"].shape == (4,)
    np.testing.assert_allclose(out["norms"], out["ref_norms"], rtol=1e-10)


def test_per_example_rules_refuse_one_use_of_a_tied_parameter():
    model = _tiny()
    # Shapes only: the refusal is a trace-time check, so nothing needs compiling.
    params = jax.eval_shape(lambda: model.init(jax.random.key(7), (CONTEXT,))[0])
    x, y = _batch(8)
    sites = nn.walk.leaves(model)
    tied = [s for s in sites if s.tied]
    assert [s.index for s in tied] == [0, len(sites) - 1]
    assert tied[0].path == tied[1].path == (0,)
    [group] = nn.walk.tied_groups(model)
    assert [s.layer.name for s in group] == ["embedding(13→16)", "unembedding(→13)"]

    def walk_back(params, x, y, rule):
        pred, tape = nn.walk.forward(model, params, x)
        dpred = losses.softmax_cross_entropy.grad(pred, y)

        def hook(visit):
            if visit.site.tied:
                rule(visit)
            return visit.backward()

        return nn.walk.backward(model, params, tape, dpred, hook)

    for rule in (nn.walk.batch_l2, nn.walk.batch_grad):
        with pytest.raises(ConfigError, match=r"layer 0 \(unembedding\(→13\)\).*shares its params"):
            jax.eval_shape(lambda p, x, y, rule=rule: walk_back(p, x, y, rule), params, x, y)


def test_tie_errors_name_the_paths():
    body = nn.serial(nn.embedding(5, 4), nn.tanh(), nn.unembedding(5))

    def init(model):  # shapes only: the errors are found while tracing, nothing compiles
        return jax.eval_shape(lambda: model.init(jax.random.key(0), (3,))[0])

    with pytest.raises(FbpError, match=r"tie\(1←0\): the tied layers need params of one layout"):
        init(nn.tie(body, {1: 0}))
    with pytest.raises(ConfigError, match=r"target 5 is not the params path of a leaf layer"):
        nn.tie(body, {5: 0})
    with pytest.raises(ConfigError, match=r"tie\(2←0\.x\): source 0\.x is not.*sit at 0, 1, 2"):
        nn.tie(body, {2: (0, "x")})
    wrong = nn.tie(nn.serial(nn.embedding(5, 4), nn.unembedding(6)), {1: 0})
    with pytest.raises(FbpError, match=r"tie\(1←0\): the tied layers need params of one layout"):
        init(wrong)
    model = nn.tie(body, {2: 0})
    params = init(model)
    untied = (*params[:2], params[0])
    with pytest.raises(FbpError, match=r"expected None at the tied path 2.*untied model's params"):
        jax.eval_shape(model.apply, untied, jax.ShapeDtypeStruct((1, 3), jnp.int32))


@pytest.mark.slow  # a checkpoint round trip and an AdamW step of the tied GPT; the fast loop ties params in the gradient tests
def test_tied_params_checkpoint_and_mask_as_one_table(tmp_path):
    model = _tiny()
    params = _params(model, 9)
    opt = optax.adamw(1e-3, mask=lambda p: jax.tree.map(lambda a: a.ndim >= 2, p))

    @jax.jit
    def step(params, x, y):
        grads = fbp.grad(model, losses.softmax_cross_entropy)(params, x, y)
        updates, state = opt.update(grads, opt.init(params), params)
        return optax.apply_updates(params, updates), state

    params, state = step(params, *_batch(10))
    path = checkpoint.save_checkpoint(tmp_path / "gpt.fbp", params, state, step=1)
    back = checkpoint.load_checkpoint(path, target=(params, state))
    assert back.params[-1] is None
    for a, b in zip(
        jax.tree.leaves((params, state)),
        jax.tree.leaves((back.params, back.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    n_tied = sum(a.size for a in jax.tree.leaves(params))
    n_untied = sum(
        a.size
        for a in jax.tree.leaves(
            jax.eval_shape(lambda: _tiny(tied=False).init(jax.random.key(9), (8,))[0])
        )
    )
    assert n_untied - n_tied == VOCAB * 16


# --------------------------------------------------------------------------- generation


def test_generate_traces_the_model_once_and_reuses_the_compiled_loop():
    model = _tiny()
    params = _params(model, 11)
    traces = []
    counted = model._replace(
        forward=lambda p, x, **kw: (traces.append(x.shape), model.forward(p, x, **kw))[1]
    )
    prompt = jnp.array([1, 2, 3])
    a = models.generate(counted, params, prompt, 20, key=jax.random.key(0), context=CONTEXT)
    assert len(traces) == 1 and traces[0] == (1, CONTEXT)  # 20 tokens, one trace
    b = models.generate(
        counted, params, prompt + 1, 20, key=jax.random.key(1), context=CONTEXT, temperature=0.5
    )
    assert len(traces) == 1  # new prompt, key and temperature: the same compiled program
    assert a.shape == b.shape == (20,) and a.dtype == jnp.int32
    assert set(np.asarray(a).tolist()) <= set(range(VOCAB))


@pytest.mark.slow  # a second generation program; the fast loop generates in the trace-once test
def test_generate_greedy_equals_argmax_of_the_full_forward():
    model = _tiny()
    params = _params(model, 12)
    prompt = jnp.array([4, 5, 6, 7, 8, 9])  # 6 tokens: the window fills, then slides
    ids = models.generate(model, params, prompt, 6, key=jax.random.key(0), context=CONTEXT, top_k=1)
    seq = list(map(int, prompt))
    apply = jax.jit(model.apply)  # one program per window length (6, 7, 8), not per op
    for _ in range(6):
        window = np.asarray(seq[-CONTEXT:], np.int32)[None]
        seq.append(int(np.argmax(apply(params, window)[0, -1])))
    assert list(map(int, ids)) == seq[len(prompt) :]


def test_positional_embedding_refuses_a_sequence_longer_than_its_context():
    model = _tiny()
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), (CONTEXT,))[0])
    too_long = jax.ShapeDtypeStruct((1, CONTEXT + 1), jnp.int32)
    with pytest.raises(
        FbpError,
        match=r"serial layer 1 \(positional_embedding\(context=8\)\): a sequence of 9 "
        r"positions is longer than the context of 8",
    ):
        jax.eval_shape(model.apply, params, too_long)


# --------------------------------------------------------------------------- data, training, CLI

from fbp import cli, data  # noqa: E402
from fbp import train as fbp_train  # noqa: E402


def test_text_dataset_split_vocabulary_and_windows(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("hello world\n" * 50, encoding="utf-8")
    ds = data.load_text(path, validation_fraction=0.2)
    assert ds.vocab == "\n dehlorw" and ds.vocab_size == 9
    assert len(ds.train) == 480 and len(ds.validation) == 120
    assert ds.decode(np.concatenate([ds.train, ds.validation])) == "hello world\n" * 50
    assert data.load_text(path, validation_fraction=0.2).train.tobytes() == ds.train.tobytes()
    x, y = jax.jit(data.text_batch, static_argnums=(2, 3))(jax.random.key(0), ds.train, 5, 7)
    assert x.shape == y.shape == (5, 7) and x.dtype == jnp.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the next characters
    with pytest.raises(FbpError, match=r"characters 'Z' are not in the model's vocabulary"):
        ds.encode("helloZ")
    stdlib = data.load_text(max_bytes=50_000)
    assert stdlib.name == "python-stdlib" and len(stdlib.train) + len(stdlib.validation) == 50_000


def test_fit_text_trains_checkpoints_resumes_exactly_and_refuses_other_settings(tmp_path, capsys):
    """fit_text's loop, checkpoint and resume on a bigram model (embedding → dense head: the
    GPT's training programs are the slow tests'). One model and one optimizer object, so
    every run reuses one compiled program of steps and one of validation."""
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 40, encoding="utf-8")
    ds = data.load_text(text)
    model = nn.serial(nn.embedding(ds.vocab_size, 8), nn.dense(ds.vocab_size))
    optimizer = fbp_train.gpt_optimizer(20, learning_rate=1e-2)

    # Params drawn by numpy (model.init would compile a random program per shape; fit_text's
    # own init runs in the slow tests and its docstring example).
    params = _params(model, 0)

    def run(directory, on_eval=None, batch_size=4):
        return fbp_train.fit_text(
            model, ds, optimizer, steps=20, batch_size=batch_size, context=16,
            key=jax.random.key(0), params=params, eval_every=10, eval_batches=2,
            checkpoint_dir=directory, progress=False, on_eval=on_eval,
        )  # fmt: skip

    whole, history = run(tmp_path / "whole")
    assert history.step == (10, 20) and len(history.train_loss) == len(history.seconds) == 2
    assert history.val_loss[1] < history.val_loss[0] < np.log(ds.vocab_size) + 0.5
    saved = checkpoint.load_checkpoint(tmp_path / "whole" / fbp_train.GPT_CHECKPOINT_NAME)
    assert saved.step == 20 and saved.metadata["vocab"] == ds.vocab

    def stop(step, *_):
        if step == 20:  # after iteration 10's checkpoint, before iteration 20's
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run(cut, on_eval=stop)
    assert checkpoint.load_checkpoint(cut / fbp_train.GPT_CHECKPOINT_NAME).step == 10
    evaluated = []
    resumed, resumed_history = run(cut, on_eval=lambda step, *_: evaluated.append(step))
    assert evaluated == [20]  # iterations 11-20 only: it resumed from iteration 10
    assert resumed_history.step == history.step
    assert resumed_history.train_loss == history.train_loss
    assert resumed_history.val_loss == history.val_loss
    as_dict = resumed_history.as_dict()  # what the checkpoint's metadata holds
    assert list(as_dict) == ["step", "train_loss", "val_loss", "seconds"]
    assert as_dict["step"] == [10, 20] and as_dict["val_loss"] == list(history.val_loss)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(
        FbpError, match=r"was written by a run with another batch_size \(4, now 5\)"
    ):
        run(cut, batch_size=5)
    # fbp sample reads only GPT checkpoints of fbp train, and says so.
    assert cli.main(["sample", "--checkpoint-dir", str(cut)]) == 1
    assert "is not a GPT checkpoint of fbp train" in capsys.readouterr().err
    assert cli.main(["sample", "--checkpoint-dir", str(tmp_path)]) == 2
    assert "(train one with fbp train --model gpt" in capsys.readouterr().err


@pytest.mark.slow  # CLI training end to end; the fast loop trains with fit_text and samples
def test_cli_trains_a_tiny_gpt_below_2_1_validation_loss_saves_it_and_samples_from_it(
    tmp_path, capsys
):
    """``fbp train --model gpt`` on the first 300,000 characters of the standard library (in a
    file: the same dataset as ``load_text(max_bytes=300_000)``), 400 iterations of a 2-layer
    GPT: fit_text with a GPT learns, the CLI reports and saves it, and ``fbp sample`` reads it
    back. One training run serves both checks (each compiled its own GPT programs)."""
    ds = data.load_text(max_bytes=300_000)
    text = tmp_path / "stdlib.txt"
    text.write_text(ds.decode(np.concatenate([ds.train, ds.validation])), encoding="utf-8")
    same = data.load_text(text)
    assert same.vocab == ds.vocab
    np.testing.assert_array_equal(same.train, ds.train)
    np.testing.assert_array_equal(same.validation, ds.validation)
    small = ["--context", "32", "--layers", "2", "--heads", "2", "--width", "64"]
    argv = ["train", "--model", "gpt", "--text", str(text), "--iters", "400", "--eval-every",
            "200", "--batch-size", "16", "--learning-rate", "2e-3", "--sample-length", "12",
            "--no-progress", "--checkpoint-dir", str(tmp_path / "run"), *small]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "GPT 2 layers, 2 heads, width 64, context 32, tied head" in out, out
    assert "AdamW lr=0.002 (warm-up 100, cosine to 0.0002), batch 16, 400 iterations" in out, out
    assert re.search(r"iter +200: train loss [\d.]+, val loss [\d.]+", out), out
    # A uniform guess scores log(vocab) ≈ 4.5, character frequencies alone about 3.3;
    # this run measured 2.17 after 200 iterations and 1.92 after 400.
    val_loss = float(re.search(r"final val loss ([\d.]+) after 400 iterations", out).group(1))
    assert val_loss < 2.1, out
    assert "sample:\n" in out
    assert (tmp_path / "run" / fbp_train.GPT_CHECKPOINT_NAME).exists()
    # The training run's sampler settings (length 12, top-k 200): the same compiled program.
    argv = ["sample", "--checkpoint-dir", str(tmp_path / "run"), "--prompt", "def ",
            "--length", "12", "--top-k", "200"]  # fmt: skip
    assert cli.main(argv) == 0
    sample = capsys.readouterr().out
    assert sample.startswith("def ") and len(sample.rstrip("\n")) >= 16
    assert set(sample) <= set(ds.vocab)
    assert "€" not in ds.vocab
    assert cli.main(["sample", "--checkpoint-dir", str(tmp_path / "run"), "--prompt", "€"]) == 1
    assert "'€' are not in the model's vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--heads", "3"], r"argument --heads: 3 does not divide --width 128"),
        (["--text", "/nonexistent.txt"], r"argument --text: no such text file"),
    ],
)
def test_cli_gpt_usage_errors_are_one_line(argv, message, capsys):
    assert cli.main(["train", "--model", "gpt", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err


@pytest.mark.slow  # a third float64 GPT program; the fast loop checks nn.recompute in the layer catalogue
def test_gpt_with_recomputed_gelu_keeps_its_gradient_in_float64():
    loss = losses.softmax_cross_entropy
    with jax.enable_x64(True):
        lean = _tiny(recompute=True, dtype=jnp.float64)
        params = _params(lean, 13)
        x, y = _batch(14)

        @jax.jit
        def run(params, x, y):
            _, grads = fbp.value_and_grad(lean, loss)(params, x, y)
            return grads, jax.grad(lambda p: loss.value(lean.apply(p, x), y))(params)

        grads, ref = run(params, x, y)
    assert "recompute(serial)" in [s.layer.name for s in nn.walk.leaves(lean)]
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-14 * np.abs(r).max())


@pytest.mark.slow  # every rule's backward of a GPT (one program)
def test_credit_assignment_rules_run_on_the_tied_gpt():
    """Every rule reaches the tied table's two uses: backprop's rule is the gradient; FA, SS
    and DFA keep each layer's local gradient but change the error the layers below receive."""
    from fbp import rules

    loss = losses.softmax_cross_entropy
    model = _tiny()
    params = _params(model, 0)
    x, y = _batch(1)
    every = (
        rules.backprop(),
        rules.feedback_alignment(jax.random.key(2)),
        rules.sign_symmetric(),
        rules.direct_feedback_alignment(jax.random.key(3)),
    )

    @jax.jit  # the gradient and every rule's updates in one program
    def run(params, x, y):
        grads = fbp.grad(model, loss)(params, x, y)
        return grads, [fbp.grad(model, loss, rule=rule)(params, x, y) for rule in every]

    grads, all_updates = run(params, x, y)
    for rule, updates in zip(every, all_updates, strict=True):
        assert jax.tree.structure(updates) == jax.tree.structure(grads), rule.name
        assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates)), rule.name
        table = np.asarray(updates[0]["embedding"])
        if rule.name == "backprop":
            for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
                np.testing.assert_allclose(u, g, rtol=1e-5, atol=1e-7)
        else:  # the error below the head is the rule's, so the table's update differs
            assert not np.allclose(table, grads[0]["embedding"], rtol=1e-3), rule.name
