"""Generation on the training mesh: parameters keep their training shardings (experts over
`expert`, heads / vocab over `tensor`), rollout rows go over the data axes; the result equals the
single-device run."""

import jax
import numpy as np
from flax import nnx

from nemocascade.generate import generate
from nemocascade.sharding import make_mesh, state_shardings
from tests.generate.conftest import PROMPTS

# fp32 log-probs, sharded vs unsharded: the project's fp32 logit tolerance. Splitting contractions
# over `tensor` reorders fp32 sums: the plain forward pass of this model already differs by ~1.1e-5
# in its logits between the two layouts, so 1e-5 would test summation order, not the engine.
ATOL = 1e-4


def test_sharded_generation_matches_single_device(models):
    _, model = models
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    sharded = jax.device_put(state, shardings)
    up = sharded["layers"][2]["mixer"]["up_EDF"][...]
    assert up.sharding.spec[0] == "expert"  # experts stay split over `expert`
    # the sampling settings of test_sampling (the unsharded program is shared when run together)
    kw = {"max_new_tokens": 10, "n": 2, "seed": 5, "temperature": 0.8, "top_k": 40, "top_p": 0.9}
    ref = generate(model, PROMPTS, **kw)
    got = generate(
        (graphdef, sharded), PROMPTS, mesh=mesh, record_routes=True, **kw
    )  # 3 prompts -> 4 rows on 4 data shards
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    # routing replay: the experts recorded on the mesh are a forward's on one device (up to
    # fp32 near-ties of two router scores: at most 1% of (position, layer) pairs)
    differ = []
    for r, routes in enumerate(got.routes):
        seq = PROMPTS[got.prompt_index[r]] + got.tokens[r, : got.lengths[r] - 1].tolist()
        fresh = model(np.asarray([seq]), return_aux=True)[1]["routes"][:, 0]  # [n_moe, T, K]
        fresh = np.sort(np.moveaxis(np.asarray(fresh), 0, 1), -1)
        differ += np.any(np.sort(routes, -1) != fresh, -1).ravel().tolist()
    assert np.mean(differ) <= 0.01
    np.testing.assert_array_equal(got.lengths, ref.lengths)
    # (`.logprobs` under the nucleus is not compared: a token within 1e-6 of the top-p boundary
    # may fall on either side of it, a discontinuity of the renormaliser, not an error)
    np.testing.assert_allclose(got.logprobs_untempered, ref.logprobs_untempered, atol=ATOL, rtol=0)
    # the parameters were used in place: same shardings after generation
    assert jax.tree.map(lambda a: a.sharding, sharded) == jax.tree.map(lambda s: s, shardings)
