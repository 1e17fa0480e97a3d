"""gradprobe on real code nobody here wrote: small adapted copies of pytorch/examples programs
(tests/examples/, BSD 3-Clause, see tests/examples/LICENSE).

Every example trains bit-identically with and without the probe, with the default schedule and
with `every=1`, and the probe states the facts a user of that example would expect.
"""

import pytest

from tests.conftest import line_of, shown
from tests.examples import actor_critic, dcgan, mnist, time_sequence_prediction, vae, word_language_model
from tests.identical import check_identical

# name -> (module, run kwargs); tiny sizes, few iterations
EXAMPLES = {
    "dcgan": (dcgan, {"steps": 2}),  # 64x64 architecture: batch 2, 2 iterations
    "word_language_model": (word_language_model, {"steps": 3}),
    "mnist": (mnist, {"steps": 2, "epochs": 2}),
    "actor_critic": (actor_critic, {"steps": 3}),
    "time_sequence_prediction": (time_sequence_prediction, {"steps": 2}),
    "vae": (vae, {"steps": 3}),
}
SCHEDULES = {"default": {}, "every1": {"every": 1}}

_runs: dict = {}


def probed(name: str, schedule: str):
    """(probe, result of the probed run) of `name` under check_identical; one run per test session.

    A failure is remembered and raised again for every test that needs this run.
    """
    key = (name, schedule)
    if key not in _runs:
        module, kwargs = EXAMPLES[name]
        results = []

        def train(wrap):
            results.append(module.run(wrap, **kwargs))
            return results[-1]

        try:
            probe = check_identical(train, **SCHEDULES[schedule])
            _runs[key] = (probe, results[-1], None)
        except BaseException as e:  # noqa: BLE001 - re-raised below, every time
            _runs[key] = (None, None, e)
    probe, result, error = _runs[key]
    if error is not None:
        raise error
    return probe, result


def example_site(module, text: str, nth: int | None = None) -> str:
    """`tests/examples/NAME.py:LINE` of the line of the adapted example containing `text`."""
    path = module.__file__
    return f"{shown(path)}:{line_of(path, text, nth)}"


def steps_of(table) -> list:
    return sorted(int(s) for s in table["step"].unique())


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_trains_identically_with_the_probe(name, schedule):
    probe, _ = probed(name, schedule)
    assert len(probe.to_pandas()["backward"]) > 0


# --- dcgan: two optimizers, fake.detach() for the discriminator, errD.item() in the print -----------

DCGAN_ITERS = EXAMPLES["dcgan"][1]["steps"]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_dcgan_has_one_step_per_iteration_of_its_two_optimizers(schedule):
    probe, _ = probed("dcgan", schedule)
    bw = probe.to_pandas()["backward"]
    assert len(bw) == 3 * DCGAN_ITERS  # errD_real, errD_fake, errG per iteration
    assert bw["step"].max() == DCGAN_ITERS - 1
    assert steps_of(bw) == list(range(DCGAN_ITERS))
    assert bw.groupby("step").size().tolist() == [3] * DCGAN_ITERS


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_dcgan_detach_of_the_fake_batch_is_recorded_at_its_line(schedule):
    probe, _ = probed("dcgan", schedule)
    cuts = probe.to_pandas()["cuts"]
    site = example_site(dcgan, "output = netD(fake.detach())")
    here = cuts[cuts["site"] == site]
    assert not here.empty, f"no cut at {site}: {cuts[['step', 'kind', 'site']].to_dict('records')}"
    assert set(here["kind"]) == {"detach"}
    assert steps_of(here) == list(range(DCGAN_ITERS))  # one per iteration
    for up in here["upstream"]:
        assert any(str(n).startswith("G.") for n in up), up  # it cut the generator's graph
    assert here["effective"].all()  # errD_fake.backward() would have reached G through it


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_dcgan_deliberate_detach_is_no_gradient_error(schedule):
    probe, _ = probed("dcgan", schedule)
    errors = [f for f in probe.findings if f.kind == "no_gradient" and f.severity == "error"]
    assert not errors, [f.message for f in errors]
    site = example_site(dcgan, "output = netD(fake.detach())")
    at_detach = [f for f in probe.findings if f.site == site]
    assert all(f.severity == "info" for f in at_detach), [(f.kind, f.severity, f.message) for f in at_detach]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_dcgan_every_parameter_gets_a_gradient_every_iteration(schedule):
    probe, _ = probed("dcgan", schedule)
    # errG.backward() reaches G, errD_real/errD_fake.backward() reach D
    params = probe.to_pandas()["params"]
    per_step = params[params["status"] == "flow"].groupby("step")["param"].nunique()
    n_params = params["param"].nunique()
    assert per_step.reindex(range(DCGAN_ITERS)).tolist() == [n_params] * DCGAN_ITERS


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_dcgan_item_calls_after_the_steps_are_never_a_cause(schedule):
    probe, _ = probed("dcgan", schedule)
    params = probe.to_pandas()["params"]
    item_sites = {
        example_site(dcgan, "print('[%d/%d][%d/%d] Loss_D"),
        example_site(dcgan, "% (epoch, niter, i, len(dataloader),"),
        example_site(dcgan, "errD.item(), errG.item(), D_x, D_G_z1, D_G_z2))", nth=1),
        example_site(dcgan, "losses.append((errD.item(), errG.item()"),
    }
    none = params[params["status"] == "none"]
    wrong = none[none["site"].isin(item_sites)]
    assert wrong.empty, wrong[["step", "backward", "param", "cause", "site"]].to_dict("records")


# --- word_language_model: manual SGD through p.data, no torch.optim -------------------------------

@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_word_language_model_has_one_step_per_batch_without_torch_optim(schedule):
    probe, result = probed("word_language_model", schedule)
    batches = EXAMPLES["word_language_model"][1]["steps"]
    assert len(result["losses"]) == batches
    bw = probe.to_pandas()["backward"]
    assert len(bw) == batches
    assert steps_of(bw) == list(range(batches))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_word_language_model_every_parameter_flows_despite_repackage_hidden(schedule):
    probe, _ = probed("word_language_model", schedule)
    params = probe.to_pandas()["params"]
    assert set(params["status"]) == {"flow"}, params[params["status"] != "flow"][
        ["step", "param", "status", "cause", "site"]].to_dict("records")
    assert not [f for f in probe.findings if f.kind == "no_gradient"]


# --- mnist: Adadelta + StepLR, test() under no_grad -------------------------------------------------

@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_mnist_has_one_step_per_batch_across_epochs(schedule):
    probe, result = probed("mnist", schedule)
    kw = EXAMPLES["mnist"][1]
    n = kw["steps"] * kw["epochs"]
    assert len(result["losses"]) == n
    t = probe.to_pandas()
    assert len(t["backward"]) == n
    assert steps_of(t["backward"]) == list(range(n))
    assert set(t["params"]["status"]) == {"flow"}


# --- actor_critic: one forward per environment step, one backward per episode ----------------------

@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_actor_critic_has_one_step_per_episode(schedule):
    probe, result = probed("actor_critic", schedule)
    episodes = EXAMPLES["actor_critic"][1]["steps"]
    assert len(result["losses"]) == episodes
    t = probe.to_pandas()
    assert len(t["backward"]) == episodes
    assert steps_of(t["backward"]) == list(range(episodes))
    assert set(t["params"]["status"]) == {"flow"}  # actor and critic heads both train


# --- time_sequence_prediction: LSTMCell sequence trained with LBFGS and a closure -------------------

@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_lbfgs_example_has_one_step_per_optimizer_step(schedule):
    probe, result = probed("time_sequence_prediction", schedule)
    iterations = EXAMPLES["time_sequence_prediction"][1]["steps"]
    bw = probe.to_pandas()["backward"]
    assert len(bw) == len(result["losses"])  # one backward per closure call
    assert len(result["losses"]) > iterations  # LBFGS called the closure several times per step
    assert steps_of(bw) == list(range(iterations))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_lbfgs_internals_are_not_user_cuts(schedule):
    probe, _ = probed("time_sequence_prediction", schedule)
    cuts = probe.to_pandas()["cuts"]
    path = shown(time_sequence_prediction.__file__)
    assert all(str(s).startswith(path + ":") for s in cuts["site"]), cuts[["kind", "site"]].to_dict("records")
    step_line = example_site(time_sequence_prediction, "optimizer.step(closure)")
    assert not (cuts["site"] == step_line).any()  # LBFGS's own float(closure()) is not the user's cut
    params = probe.to_pandas()["params"]
    assert set(params["status"]) == {"flow"}


# --- every example: a correct program gets no error ------------------------------------------------

@pytest.mark.parametrize("name", ["word_language_model", "mnist", "actor_critic", "time_sequence_prediction", "vae"])
def test_correct_example_gets_no_error_finding(name):
    probe, _ = probed(name, "default")
    errors = [f for f in probe.findings if f.severity == "error"]
    assert not errors, [(f.kind, f.site, f.message) for f in errors]
