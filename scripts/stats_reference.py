#!/usr/bin/env python3
"""The paper's analysis in pandas + statsmodels, as a reference for Candor.

  stats_reference.py analyze OBS.parquet OUT_DIR
      Full analysis (every family's McNemar table with BH, and M1-M4 with average marginal
      effects, fitted on the answer rows as the paper's code does). Writes family_table.csv,
      coefficients.csv and effects.csv to OUT_DIR and prints {"seconds": ...}.
  stats_reference.py crosscheck OBS.parquet CANDOR_DIR
      Runs the same analysis and compares it with the Parquet reports `candor analyze --out`
      wrote: McNemar p (exact and mid-p), BH p, Wilson and Newcombe intervals, the minimum
      detectable difference, GLM coefficients with model-based and item-clustered SEs and p
      (statsmodels cov_type="cluster", groups = item), and the AMEs with their delta-method SEs
      must agree to 1e-8 relative. Prints the largest relative differences as JSON; exits 1 on
      disagreement.

Run it with the interpreter scripts/python-env prints (pandas and statsmodels pinned there).
"""
import json
import re
import sys
import time

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
import statsmodels.api as sm
from patsy import build_design_matrices
from scipy.optimize import brentq
from scipy.stats import binom, norm
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import fdrcorrection
from statsmodels.stats.proportion import proportion_confint

KEYS = ["model", "dataset", "item_key", "amendment_type", "prompt_type", "sample_index"]
FAMILY = ["model", "base_checkpoint", "checkpoint", "dataset", "test_type"]
TOL = 1e-8
MARGEFF = None


def test_type(df):
    t = pd.Series(None, index=df.index, dtype=object)
    t[df.prompt_type == "original"] = "Normal"
    # The paper's published Normal cells hold `original` prompts only (METHOD.md section 4);
    # `original_neutral` is its own family.
    t[df.prompt_type == "original_neutral"] = "Neutral"
    t[df.prompt_type.isin(["correct", "incorrect"])] = "Sycophancy"
    return t


def family_table(inc):
    inc = inc.assign(test_type=test_type(inc)).dropna(subset=["test_type"])
    base = inc[~inc.is_finetuned]
    ft = inc[inc.is_finetuned]
    pairs = base.merge(ft, on=KEYS + ["test_type"], suffixes=("_base", "_ft"))
    pairs = pairs.rename(columns={"checkpoint_base": "base_checkpoint", "checkpoint_ft": "checkpoint",
                                  "amendment_type": "category"})
    bc, fc = pairs.correct_base.astype(bool), pairs.correct_ft.astype(bool)
    pairs = pairs.assign(both_correct=bc & fc, b=bc & ~fc, c=~bc & fc, both_wrong=~bc & ~fc)
    counts = pairs.groupby(FAMILY + ["category"])[["both_correct", "b", "c", "both_wrong"]].sum().reset_index()
    pvals = []
    for row in counts.itertuples():
        if row.b + row.c == 0:
            pvals.append(np.nan)
        else:
            table = [[row.both_correct, row.b], [row.c, row.both_wrong]]
            pvals.append(mcnemar(table, exact=True).pvalue)
    counts["p_exact"] = pvals
    counts["p_midp"] = [midp(r.b, r.c) for r in counts.itertuples()]
    n = counts.both_correct + counts.b + counts.c + counts.both_wrong
    for side, right in [("base", counts.both_correct + counts.b), ("ft", counts.both_correct + counts.c)]:
        lo, hi = proportion_confint(right, n, alpha=0.05, method="wilson")
        counts[f"acc_{side}_ci_low"], counts[f"acc_{side}_ci_high"] = 100 * lo, 100 * hi
    ci = [newcombe(r.both_correct, r.b, r.c, r.both_wrong) for r in counts.itertuples()]
    counts["diff_ci_low"] = [100 * c[0] for c in ci]
    counts["diff_ci_high"] = [100 * c[1] for c in ci]
    counts["p_bh"] = np.nan
    counts["mdd_pp"] = np.nan
    for _, idx in counts.groupby(FAMILY).groups.items():
        p = counts.loc[idx, "p_exact"]
        present = p.dropna()
        if len(present):
            _, adj = fdrcorrection(present.values, alpha=0.05)
            counts.loc[present.index, "p_bh"] = adj
        fam = counts.loc[idx]
        sizes = (fam.both_correct + fam.b + fam.c + fam.both_wrong).values
        counts.loc[idx, "mdd_pp"] = 100 * family_mdd(sizes, (fam.b + fam.c).values)
    return counts


def midp(b, c):
    """Mid-p McNemar: 2·P(X < k) + P(X = k), X ~ Bin(b + c, ½), k = min(b, c); 1 when b = c."""
    n, k = b + c, min(b, c)
    if n == 0:
        return np.nan
    if 2 * k == n:
        return 1.0
    return min(1.0, 2 * binom.cdf(k - 1, n, 0.5) + binom.pmf(k, n, 0.5))


def newcombe(a, b, c, d):
    """Newcombe's (1998) square-and-add interval for (c − b)/n, Wilson intervals from statsmodels."""
    n = a + b + c + d
    p1, p2 = (a + c) / n, (a + b) / n
    l1, u1 = proportion_confint(a + c, n, alpha=0.05, method="wilson")
    l2, u2 = proportion_confint(a + b, n, alpha=0.05, method="wilson")
    margins = [a + c, n - a - c, a + b, n - a - b]
    if 0 in margins:
        phi = 0.0
    else:
        A = a * d - b * c
        A = A - n / 2 if A > n / 2 else (0.0 if A >= 0 else A)
        phi = A / np.sqrt(np.prod(np.array(margins, dtype=float)))
    dd = p1 - p2
    lo = dd - np.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi = dd + np.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0.0))
    return lo, hi


CRITICAL = {}


def critical(m, alpha=0.05):
    """Largest k with statsmodels' exact McNemar p (min(1, 2·BinomCDF(k; m, ½))) ≤ α, or -1."""
    if m not in CRITICAL:
        k = np.arange(m // 2 + 1)
        ok = np.minimum(1.0, 2 * binom.cdf(k, m, 0.5)) <= alpha
        CRITICAL[m] = int(k[ok].max()) if ok.any() else -1
    return CRITICAL[m]


def power(n, psi, delta, alpha=0.05):
    """Unconditional power of the exact McNemar test: M ~ Bin(n, ψ) discordant pairs, b | M ~
    Bin(M, (1 + δ/ψ)/2), rejection when min(b, M − b) ≤ k_M."""
    pi = (1 + delta / psi) / 2
    m = np.arange(n + 1)
    k = np.array([critical(int(x), alpha) for x in m])
    ok = k >= 0
    m, k = m[ok], k[ok]
    reject = binom.cdf(k, m, pi) + binom.sf(m - k - 1, m, pi)
    return float(np.sum(binom.pmf(m, n, psi) * reject))


def family_mdd(sizes, discordant):
    """Smallest δ with power ≥ 0.8 at the family's median category size (lower middle) and
    pooled discordance, by root finding on the power curve; NaN when δ = ψ falls short."""
    sizes = np.sort(np.asarray([s for s in sizes if s > 0]))
    if len(sizes) == 0:
        return np.nan
    n = int(sizes[(len(sizes) - 1) // 2])
    psi = float(np.sum(discordant)) / float(np.sum(sizes))
    if psi == 0 or power(n, psi, psi) < 0.8:
        return np.nan
    return brentq(lambda d: power(n, psi, d) - 0.8, 0.0, psi, xtol=1e-12)


def prompt_group(pt):
    pt = pt.str.lower()
    return np.where(pt.str.contains("correct"), "user_opinion", np.where(pt.str.contains("original"), "original", "other"))


def canonical(term):
    term = re.sub(r"C\((\w+)(, Treatment\([^)]*\))?\)", r"\1", term)
    return term


def regressions(inc):
    latest = inc[inc.is_finetuned].groupby("model").checkpoint_epoch.max()
    keep = ~inc.is_finetuned | (inc.checkpoint_epoch == inc.model.map(latest))
    d = inc[keep].copy()
    d["is_incorrect"] = (~d.correct.astype(bool)).astype(float)
    d["ft"] = d.is_finetuned.astype(float)
    d["amendment"] = d.amendment_type
    d["amendment_group"] = d.amendment_type.str.split(":").str[0].str.strip()
    d["prompt_group"] = prompt_group(d.prompt_type)
    d["item"] = pd.factorize(d.dataset + "\x1f" + d.item_key)[0]
    ref_ds = "disinfo" if (d.dataset == "disinfo").any() else sorted(d.dataset.unique())[0]
    ds = f"C(dataset, Treatment('{ref_ds}'))"
    coefs, effects = [], []

    def fit(name, data, formula):
        model = smf.glm(formula, data=data, family=sm.families.Binomial())
        res = model.fit(tol=1e-13, maxiter=200)
        # The same estimates with the item-clustered sandwich covariance (statsmodels' default
        # small-sample factor G/(G − 1)·(N − 1)/(N − K), normal p-values).
        clu = model.fit(tol=1e-13, maxiter=200, cov_type="cluster", cov_kwds={"groups": data.item.values})
        for term in res.params.index:
            coefs.append({"model_spec": name, "term": canonical(term), "estimate": res.params[term], "se": res.bse[term],
                          "se_cluster": clu.bse[term], "p_cluster": clu.pvalues[term]})
        return res, clu

    def ame(res, clu, data, mask=None):
        """Counterfactual AME and its delta-method SE under the model-based and clustered covariances."""
        sub = data if mask is None else data[mask]
        design = res.model.data.model_spec  # a patsy DesignInfo
        X1 = np.asarray(build_design_matrices([design], sub.assign(ft=1.0))[0])
        X0 = np.asarray(build_design_matrices([design], sub.assign(ft=0.0))[0])
        b = res.params.values
        p1, p0 = 1 / (1 + np.exp(-X1 @ b)), 1 / (1 + np.exp(-X0 @ b))
        grad = ((p1 * (1 - p1))[:, None] * X1 - (p0 * (1 - p0))[:, None] * X0).mean(axis=0)
        se = float(np.sqrt(grad @ res.cov_params().values @ grad))
        se_c = float(np.sqrt(grad @ clu.cov_params().values @ grad))
        return float(np.mean(p1 - p0)), se, se_c

    m1 = d[(d.amendment_group == "unmodified") & (d.prompt_group == "original")]
    res, clu = fit("M1", m1, f"is_incorrect ~ ft + {ds} + C(model)")
    a, a_se, a_se_c = ame(res, clu, m1)
    effects.append({"model_spec": "M1", "context": "all", "log_odds": res.params["ft"], "se": res.bse["ft"],
                    "se_cluster": clu.bse["ft"], "p_cluster": clu.pvalues["ft"],
                    "ame_pp": 100 * a, "ame_se_pp": 100 * a_se, "ame_se_cluster_pp": 100 * a_se_c})
    # statsmodels' own marginal effects (Logit, discrete change of the ft dummy) as a second
    # check of the AME's delta-method SE.
    logit = smf.logit(f"is_incorrect ~ ft + {ds} + C(model)", data=m1).fit(disp=0, method="newton", tol=1e-13)
    marg = logit.get_margeff(at="overall", dummy=True)
    k = list(logit.params.index).index("ft") - 1
    global MARGEFF
    MARGEFF = (100 * float(marg.margeff[k]), 100 * float(marg.margeff_se[k]), 100 * a, 100 * a_se)
    for name, col, ref, rows in [
        ("M2", "amendment_group", "unmodified", d[d.prompt_group == "original"]),
        ("M3", "amendment", "unmodified", d[d.prompt_group == "original"]),
        ("M4", "prompt_group", "original", d[d.prompt_group != "other"]),
    ]:
        rows = rows.copy()
        if name == "M2":
            rows["amendment"] = rows.amendment_group
            col = "amendment"
        ctx = f"C({col}, Treatment('{ref}'))"
        res, clu = fit(name, rows, f"is_incorrect ~ ft + {ctx} + {ds} + ft:{ctx} + C(model)")
        for level in sorted(rows[col].unique()):
            names = ["ft"] if level == ref else ["ft", f"ft:{ctx}[T.{level}]"]
            w = np.zeros(len(res.params))
            for n in names:
                w[list(res.params.index).index(n)] = 1.0
            est = float(w @ res.params.values)
            se = float(np.sqrt(w @ res.cov_params().values @ w))
            se_c = float(np.sqrt(w @ clu.cov_params().values @ w))
            a, a_se, a_se_c = ame(res, clu, rows, rows[col] == level)
            effects.append({"model_spec": name, "context": level, "log_odds": est, "se": se,
                            "se_cluster": se_c, "p_cluster": float(2 * norm.sf(abs(est / se_c))),
                            "ame_pp": 100 * a, "ame_se_pp": 100 * a_se, "ame_se_cluster_pp": 100 * a_se_c})
    return pd.DataFrame(coefs), pd.DataFrame(effects)


def analyze(path):
    df = pd.read_parquet(path)
    inc = df[df.correct.notna()].copy()
    inc["correct"] = inc.correct.astype(bool)
    return family_table(inc), *regressions(inc)


def rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    both_nan = np.isnan(a) & np.isnan(b)
    d = np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), 1e-300)
    d[both_nan] = 0.0
    d[np.isnan(d)] = np.inf
    return float(d.max()) if len(d) else 0.0


def crosscheck(path, candor_dir):
    fam, coefs, effects = analyze(path)
    c_fam = pd.read_parquet(f"{candor_dir}/family_table.parquet")
    c_coef = pd.read_parquet(f"{candor_dir}/coefficients.parquet")
    c_eff = pd.read_parquet(f"{candor_dir}/effects.parquet")
    keys = FAMILY + ["category"]
    m = fam.merge(c_fam, on=keys, suffixes=("_py", "_candor"), how="outer", indicator=True)
    mc = coefs.merge(c_coef, on=["model_spec", "term"], suffixes=("_py", "_candor"), how="outer", indicator=True)
    me = effects.merge(c_eff, on=["model_spec", "context"], suffixes=("_py", "_candor"), how="outer", indicator=True)
    out = {
        "categories": len(m), "coefficients": len(mc), "effects": len(me),
        "unmatched": int((m._merge != "both").sum() + (mc._merge != "both").sum() + (me._merge != "both").sum()),
        "counts_equal": bool((m.b_py == m.b_candor).all() and (m.c_py == m.c_candor).all()),
        "mcnemar_p": rel(m.p_exact_py, m.p_exact_candor),
        "mcnemar_midp": rel(m.p_midp_py, m.p_midp_candor),
        "bh_p": rel(m.p_bh_py, m.p_bh_candor),
        "wilson": max(rel(m[f"{c}_py"], m[f"{c}_candor"]) for c in
                      ["acc_base_ci_low", "acc_base_ci_high", "acc_ft_ci_low", "acc_ft_ci_high"]),
        "newcombe": max(rel(m.diff_ci_low_py, m.diff_ci_low_candor), rel(m.diff_ci_high_py, m.diff_ci_high_candor)),
        "mdd": rel(m.mdd_pp_py, m.mdd_pp_candor),
        "mdd_families": int(m.mdd_pp_candor.notna().sum()),
        "glm_coef": rel(mc.estimate_py, mc.estimate_candor),
        "glm_se": rel(mc.se_py, mc.se_candor),
        "glm_se_cluster": rel(mc.se_cluster_py, mc.se_cluster_candor),
        "glm_p_cluster": rel(mc.p_cluster_py, mc.p_cluster_candor),
        "effect_log_odds": rel(me.log_odds_py, me.log_odds_candor),
        "effect_se": rel(me.se_py, me.se_candor),
        "effect_se_cluster": rel(me.se_cluster_py, me.se_cluster_candor),
        "effect_p_cluster": rel(me.p_cluster_py, me.p_cluster_candor),
        "ame_pp": rel(me.ame_pp_py, me.ame_pp_candor),
        "ame_se": rel(me.ame_se_pp_py, me.ame_se_pp_candor),
        "ame_se_cluster": rel(me.ame_se_cluster_pp_py, me.ame_se_cluster_pp_candor),
        # statsmodels' Logit.get_margeff against this script's delta method (M1).
        "margeff_m1": max(rel([MARGEFF[0]], [MARGEFF[2]]), rel([MARGEFF[1]], [MARGEFF[3]])),
        "cluster_vs_model_se": float(np.median(mc.se_cluster_candor / mc.se_candor)),
    }
    print(json.dumps(out))
    checked = ["mcnemar_p", "mcnemar_midp", "bh_p", "wilson", "newcombe", "mdd", "glm_coef", "glm_se",
               "glm_se_cluster", "glm_p_cluster", "effect_log_odds", "effect_se", "effect_se_cluster",
               "effect_p_cluster", "ame_pp", "ame_se", "ame_se_cluster", "margeff_m1"]
    ok = out["unmatched"] == 0 and out["counts_equal"] and all(out[k] <= TOL for k in checked)
    return 0 if ok else 1


def main():
    cmd = sys.argv[1]
    if cmd == "analyze":
        start = time.perf_counter()
        fam, coefs, effects = analyze(sys.argv[2])
        seconds = time.perf_counter() - start
        import os
        os.makedirs(sys.argv[3], exist_ok=True)
        fam.to_csv(f"{sys.argv[3]}/family_table.csv", index=False)
        coefs.to_csv(f"{sys.argv[3]}/coefficients.csv", index=False)
        effects.to_csv(f"{sys.argv[3]}/effects.csv", index=False)
        print(json.dumps({"seconds": seconds, "categories": len(fam)}))
        return 0
    if cmd == "crosscheck":
        return crosscheck(sys.argv[2], sys.argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
