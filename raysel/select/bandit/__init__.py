"""Budget allocation by a bandit over the FAISS clusters: probe a few rows with an expensive scorer, spend where it pays.

Running an expensive scorer (gradient influence, EL2N, VoG) on every row costs what the cheap
pass costs a hundred times over. The `bandit` policy treats each cluster as an arm (EQUAL, arXiv
2505.12250; Quad, arXiv 2409.16986): every round it picks some arms, scores `per_arm` unprobed rows
of each with the expensive scorer (nearest to the centroid first, or at random), and turns the mean
score into a reward that updates the arms' statistics. It stops at a round limit, at a probe budget
(a fraction of the corpus the expensive scorer may touch), when every row is probed, or, with
`allocate: plays`, when the plays have drawn the whole selection budget.

The policies are plain Python, seeded, with `propose()` / `update()` / `state_dict()` / `load_state_dict()`:

    UCBPolicy       score_k = S_k / C_k + alpha * sqrt(2 ln(sum_j C_j) / (C_k + 1)); unplayed arms first.
                    A reward r on arm a is also credited to every arm b whose centroid lies within
                    `radius` of a's (d = Euclidean distance of the unit centroids): S_b += w r, C_b += w,
                    w = 1 - d / radius (Quad) or w = 1 (EQUAL).
    EXP3SPolicy     p_k = (1 - gamma) w_k / sum_j w_j + gamma / K (LEAD, arXiv 2505.07437; Exp3.S of Auer et
                    al. 2002): n arms are drawn from p without replacement; the played arm's weight grows by
                    exp(eta r_hat) with r_hat = r / min(1, n p_k) and eta = gamma / K unless set, and every
                    weight gets (e mix / K) sum_j w_j, which lets a forgotten arm come back.
    ThompsonPolicy  Gaussian Thompson sampling: a N(0, prior_std^2) prior on each arm's mean reward and
                    N(mean, noise_std^2) rewards; the n arms with the largest posterior draws. Credits neighbours
                    like UCB.

The reward of an arm in a round is (mean expensive score of its probed rows - offset) / scale; with no
offset and scale configured they are the mean and standard deviation of the first round's scores, so
the rewards are z-scores of the corpus and alpha = 1 means what it says.

`BanditRun` is one run's rounds (which rows each arm has left, what was probed, the reward
history). `BanditAllocator` is the thin Ray actor that owns a `BanditRun` and writes its state to the
run's work dir after every round (write then rename), so a killed run, started again with the same
corpus, clusters and bandit settings, continues from the last saved round. The stopping limits and the
allocation settings are not part of that key: raising `max_rounds` or `probe_budget` continues an
earlier run, and changing how the probes are used reuses them.

The output is a budget per cluster (`allocate`):
    estimate  (default) each cluster's expensive score is modelled as N(mu_k, sigma^2): mu_k is its probe mean
              shrunk towards the mean of all probes (`prior_strength` pseudo-rows), sigma the pooled
              within-cluster deviation. The cut tau solves sum_k size_k P(score > tau) = budget, and cluster k
              gets size_k P(score > tau) rows: what an exhaustive top-k would take from it, estimated.
    plays     budget in proportion to how often the bandit played each cluster (each play draws a batch, as
              in Quad and EQUAL); the rounds stop when the plays have drawn the selection budget.
Inside a cluster (`within`): `probe` keeps first the probed rows whose expensive score clears tau, then
the unprobed rows by the cheap `select.score` (by a seeded hash of the id without one), and last the probed
rows below the cut; `cheap` ranks by the cheap score alone.

In the pipeline the policy is planned (`BanditPolicy.plan` / `apply`): the probe queues come from one pass
over the candidate rows, the probed rows are decided on the driver and the others by an exact cut per
cluster on the cheap score, so the driver never holds a row per row of the corpus. `BanditPolicy.select`
is the same policy in memory: the slow reference. `preset: quad` sets Quad's values (docs/bandit.md).

Modules: `algorithms` (the three bandit algorithms, neighbour credit, and the maths from probes to budgets),
`allocator` (one run's rounds and the allocator actor that persists them), `policy` (the `bandit` selection
policy), `queues` (the probe queues, built in one pass over the candidate rows), `probe` (scoring chosen rows
with any registered scorer, in an actor pool).
"""

from raysel.select.bandit.algorithms import (
    EXP3SPolicy,
    ThompsonPolicy,
    UCBPolicy,
    arm_estimates,
    estimated_cut,
    neighbour_weights,
)
from raysel.select.bandit.allocator import BanditAllocator, BanditRun, load_state, save_state
from raysel.select.bandit.policy import BanditParams, BanditPolicy

__all__ = [
    "BanditAllocator",
    "BanditParams",
    "BanditPolicy",
    "BanditRun",
    "EXP3SPolicy",
    "ThompsonPolicy",
    "UCBPolicy",
    "arm_estimates",
    "estimated_cut",
    "load_state",
    "neighbour_weights",
    "save_state",
]
