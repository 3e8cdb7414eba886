"""stats: is a row's mean over seeds really past a bar, is a change better at a depth, where does a
miniseries' trend cross GPT-2? The one-sided one-sample t-test a record PR needs, Welch's test for an
A/B at one depth, and the log-log power-law fit of nanochat's scaling notebook.

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


def welch(a, b, alternative="less"):
    """Welch's t-test that mean(b) is less (or "greater") than mean(a), one-sided, without assuming equal
    variances: the A/B test of a change over seeds at one depth. None when either side has under 2 values."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return None
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    diff = statistics.fmean(b) - statistics.fmean(a)
    if va + vb == 0.0:
        return {"t": math.copysign(math.inf, diff) if diff else 0.0, "df": na + nb - 2,
                "p": (0.0 if (diff < 0) == (alternative == "less") else 1.0) if diff else 0.5}
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))  # Welch-Satterthwaite
    return {"t": t, "df": df, "p": t_sf(-t if alternative == "less" else t, df)}


def power_law(xs, ys):
    """y = a * x^b by least squares on log10(x), log10(y), as nanochat's scaling notebook fits its
    straight lines in log-log (np.polyfit(log x, log y, 1)); with r2 of that line."""
    if len(xs) < 2 or min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("a power law needs at least two points, all positive")
    lx, ly = [math.log10(x) for x in xs], [math.log10(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    if sxx == 0.0:
        raise ValueError("a power law needs at least two different x")
    b = sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / sxx
    intercept = my - b * mx
    residual = sum((y - intercept - b * x) ** 2 for x, y in zip(lx, ly, strict=True))
    total = sum((y - my) ** 2 for y in ly)
    return {"a": 10 ** intercept, "b": b, "r2": 1.0 - residual / total if total else 1.0, "points": len(xs)}


def power_law_at(fit, x):
    return fit["a"] * x ** fit["b"]


def power_law_crossing(fit, y):
    """The x at which the fitted power law reaches `y` (None for a flat fit, which never does)."""
    return None if fit["b"] == 0 else (y / fit["a"]) ** (1.0 / fit["b"])
