"""stats: is a row's mean over seeds really past a bar? A one-sided one-sample t-test, as a record PR needs.

CORE is noisy (the leaderboard's record rows are means of 5-7 seeds) and modded-nanogpt asks p < 0.01
of its records, so "beats GPT-2" is a test over seeds, not a mean above 0.256525. Student's t
distribution is computed here (the regularized incomplete beta function, by its continued fraction)
rather than pulled from scipy for one function; tests/test_stats.py checks it against scipy.
"""

import math
import statistics

ALPHA = 0.01  # modded-nanogpt's threshold for a record; the report's default
_EPS, _TINY, _MAX_TERMS = 1e-15, 1e-300, 500


def _beta_fraction(a, b, x):
    """The continued fraction of the incomplete beta function (modified Lentz), converging for x < (a+1)/(a+b+2)."""
    def guard(v):
        return v if abs(v) > _TINY else _TINY
    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, _MAX_TERMS + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / guard(1.0 + numerator * d)
            c = guard(1.0 + numerator / c)
            h *= c * d
        if abs(c * d - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta({a}, {b}, {x}) did not converge")


def incomplete_beta(a, b, x):
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_sf(t, df):
    """P(T > t) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def one_sided(values, bar, alternative="greater", alpha=ALPHA):
    """Is the mean of `values` (one per seed) greater (or "less") than `bar`? The one-sample t-test:
    t = (mean - bar) / (std / sqrt(n)), df = n - 1, p its one-sided tail. With one value no test is
    possible, and with no spread between seeds p is 0 or 1 by the side the mean is on."""
    n = len(values)
    out = {"test": f"one-sided one-sample t-test, H1: mean {'>' if alternative == 'greater' else '<'} {bar}",
           "bar": bar, "n": n, "mean": statistics.fmean(values) if n else None, "alpha": alpha}
    if n < 2:
        return {**out, "std": None, "t": None, "df": None, "p": None, "significant": None,
                "why": "one seed: no test is possible (give the row seeds: [...])"}
    std = statistics.stdev(values)
    sign = 1.0 if alternative == "greater" else -1.0
    diff = sign * (out["mean"] - bar)
    if std == 0.0:
        t = math.inf if diff > 0 else -math.inf if diff < 0 else 0.0
        p = 0.0 if diff > 0 else 1.0 if diff < 0 else 0.5
    else:
        t = diff / (std / math.sqrt(n))
        p = t_sf(t, n - 1)
    return {**out, "std": std, "t": sign * t, "df": n - 1, "p": p, "significant": p < alpha}
