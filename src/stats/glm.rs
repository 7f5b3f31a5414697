//! Binomial GLM with logit link, fitted by IRLS from cell counts.
//!
//! Every covariate in the paper's regressions is categorical (or a 0/1 indicator), so a model over
//! hundreds of thousands of answers depends only on a few hundred cells of (covariate values,
//! successes, trials). Fitting on cells gives the same maximum-likelihood estimate, covariance
//! (inverse observed information, non-robust) and Wald tests as statsmodels'
//! `GLM(family=Binomial())` on the individual rows, in O(cells·p²) per iteration.
//!
//! [`GlmFit::cluster_robust`] gives the cluster-robust (sandwich) covariance of statsmodels'
//! `fit(cov_type="cluster", cov_kwds={"groups": …})`: answers to the same item are not
//! independent (one item appears under 9 contexts × 4 prompt types and on both sides of a pair),
//! so the paper's non-robust standard errors are too small when items differ in difficulty.
//! V = c · I⁻¹ (Σ_g s_g s_gᵀ) I⁻¹ with s_g the score of cluster g (Σ over its answers of
//! x (y − π̂)), I the information and statsmodels' small-sample factor
//! c = G/(G − 1) · (N − 1)/(N − K) (G clusters, N answers, K coefficients). The score only needs
//! each cluster's counts per covariate cell, so clustered fits stay count-based too.
//!
//! [`DesignBuilder`] declares variables (numeric, or factors with treatment coding against a chosen
//! reference level) and terms (intercept, main effects, interactions); column names follow
//! statsmodels/patsy style (`Intercept`, `ft`, `dataset[T.trivia]`, `ft:amendment[T.emotion]`),
//! with the terms in the order they were added (patsy would reorder them; look coefficients up by
//! name). Interactions always use reduced-rank (treatment) coding for every factor, which is what
//! patsy does when the interaction's main effects are in the model.
//!
//! ```
//! use candor::stats::glm::{fit, Cells, DesignBuilder};
//! let mut d = DesignBuilder::new();
//! let ft = d.numeric("ft");
//! d.intercept().term(&[ft]);
//! let design = d.build();
//! let mut cells = Cells::new(design.n_vars());
//! cells.push(&[0.0], 30.0, 100.0).unwrap(); // base: 30 of 100 answers incorrect
//! cells.push(&[1.0], 45.0, 100.0).unwrap(); // warm: 45 of 100
//! let model = fit(&design, &cells).unwrap();
//! let beta_ft = model.coef("ft").unwrap();
//! assert!((beta_ft.estimate - ((45.0 / 55.0) / (30.0 / 70.0f64)).ln()).abs() < 1e-12);
//! assert!((model.average_marginal_effect(&cells, ft).unwrap() - 0.15).abs() < 1e-12);
//! ```

use std::fmt;

use statrs::function::erf::erfc;

/// Index of a variable in a [`Design`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VarId(pub usize);

#[derive(Clone, Debug, PartialEq)]
enum Variable {
    Numeric {
        name: String,
    },
    /// Cell values are level indices; the reference level gets no column.
    Factor {
        name: String,
        levels: Vec<String>,
        reference: usize,
    },
}

impl Variable {
    fn name(&self) -> &str {
        match self {
            Variable::Numeric { name } | Variable::Factor { name, .. } => name,
        }
    }
}

/// One design column: a product over the term's variables of either the numeric value
/// (`None`) or the indicator of one factor level (`Some(level)`). The intercept is the empty product.
#[derive(Clone, Debug, PartialEq)]
struct Column {
    parts: Vec<(usize, Option<u32>)>,
}

/// Errors from building a design, loading cells or fitting.
#[derive(Clone, Debug, PartialEq)]
pub enum GlmError {
    /// A factor was declared with a reference level that is not among its levels.
    UnknownReference { factor: String, reference: String },
    /// A factor was declared with the same level twice.
    DuplicateLevel { factor: String, level: String },
    /// A level name not declared for the factor.
    UnknownLevel { factor: String, level: String },
    /// A cell row has the wrong number of covariate values.
    WrongArity { expected: usize, got: usize },
    /// A cell's factor value is not a level index of that factor.
    InvalidLevelCode { factor: String, value: f64 },
    /// Successes and trials must satisfy 0 ≤ successes ≤ trials, all finite.
    InvalidCounts { successes: f64, trials: f64 },
    /// No cell has any trials.
    NoData,
    /// A weight vector or term list does not fit the model.
    WrongLength { expected: usize, got: usize },
    /// A coefficient name not in the model.
    UnknownCoefficient(String),
    /// The variable is not numeric, so "set it to 0 and 1" has no meaning.
    NotNumeric(String),
    /// The information matrix is singular: the named column is (nearly) a linear combination of
    /// earlier ones, e.g. a factor level with no data or a redundant term.
    Singular { column: String },
    /// Fitted probabilities reached 0 or 1: the data are (quasi-)separated and the MLE does not
    /// exist (e.g. a level whose answers are all correct).
    Separation,
    /// IRLS did not converge within the iteration limit.
    NotConverged { iterations: usize },
    /// A clustered covariance was asked of rows that do not fit the model (fewer than two
    /// clusters, or a cluster id per row missing).
    Cluster(String),
}

impl fmt::Display for GlmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GlmError::UnknownReference { factor, reference } => {
                write!(f, "reference level {reference:?} is not a level of factor {factor:?}")
            }
            GlmError::DuplicateLevel { factor, level } => {
                write!(f, "factor {factor:?} declares level {level:?} twice")
            }
            GlmError::UnknownLevel { factor, level } => {
                write!(f, "{level:?} is not a level of factor {factor:?}")
            }
            GlmError::WrongArity { expected, got } => {
                write!(f, "cell has {got} covariate values, the design has {expected} variables")
            }
            GlmError::InvalidLevelCode { factor, value } => {
                write!(f, "{value} is not a level index of factor {factor:?}")
            }
            GlmError::InvalidCounts { successes, trials } => {
                write!(f, "invalid cell counts: {successes} successes of {trials} trials")
            }
            GlmError::NoData => write!(f, "no cell has any trials"),
            GlmError::WrongLength { expected, got } => {
                write!(f, "expected {expected} values, got {got}")
            }
            GlmError::UnknownCoefficient(name) => write!(f, "no coefficient named {name:?}"),
            GlmError::NotNumeric(name) => write!(f, "variable {name:?} is not numeric"),
            GlmError::Singular { column } => {
                write!(f, "design is rank-deficient at column {column:?} (empty level or redundant term)")
            }
            GlmError::Separation => {
                write!(f, "fitted probabilities reached 0 or 1: the data are separated and the MLE does not exist")
            }
            GlmError::NotConverged { iterations } => {
                write!(f, "IRLS did not converge in {iterations} iterations")
            }
            GlmError::Cluster(message) => write!(f, "clustered covariance: {message}"),
        }
    }
}

impl std::error::Error for GlmError {}

/// Declares variables and terms; see the module example.
#[derive(Clone, Debug, Default)]
pub struct DesignBuilder {
    vars: Vec<Variable>,
    terms: Vec<Vec<usize>>,
}

impl DesignBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A numeric covariate (e.g. the 0/1 indicator `ft`); its column is named after it.
    pub fn numeric(&mut self, name: &str) -> VarId {
        self.vars.push(Variable::Numeric { name: name.to_string() });
        VarId(self.vars.len() - 1)
    }

    /// A categorical covariate with treatment coding against `reference`; cell values are level
    /// indices in the order given (use [`Design::level`] to look one up).
    pub fn factor<S: AsRef<str>>(&mut self, name: &str, levels: &[S], reference: &str) -> Result<VarId, GlmError> {
        let levels: Vec<String> = levels.iter().map(|l| l.as_ref().to_string()).collect();
        for (i, l) in levels.iter().enumerate() {
            if levels[..i].contains(l) {
                return Err(GlmError::DuplicateLevel { factor: name.to_string(), level: l.clone() });
            }
        }
        let reference_idx = levels
            .iter()
            .position(|l| l == reference)
            .ok_or_else(|| GlmError::UnknownReference { factor: name.to_string(), reference: reference.to_string() })?;
        self.vars.push(Variable::Factor { name: name.to_string(), levels, reference: reference_idx });
        Ok(VarId(self.vars.len() - 1))
    }

    /// Adds the intercept column.
    pub fn intercept(&mut self) -> &mut Self {
        self.terms.push(Vec::new());
        self
    }

    /// Adds a main effect (one variable) or an interaction (several).
    pub fn term(&mut self, vars: &[VarId]) -> &mut Self {
        self.terms.push(vars.iter().map(|v| v.0).collect());
        self
    }

    /// Expands the terms into named columns.
    pub fn build(&self) -> Design {
        let mut columns = Vec::new();
        let mut names = Vec::new();
        for term in &self.terms {
            // Cartesian product of each variable's columns, first variable varying slowest.
            let mut partial: Vec<Vec<(usize, Option<u32>)>> = vec![Vec::new()];
            for &v in term {
                let options: Vec<Option<u32>> = match &self.vars[v] {
                    Variable::Numeric { .. } => vec![None],
                    Variable::Factor { levels, reference, .. } => {
                        (0..levels.len() as u32).filter(|&l| l as usize != *reference).map(Some).collect()
                    }
                };
                partial = partial
                    .into_iter()
                    .flat_map(|p| {
                        options.iter().map(move |&o| {
                            let mut q = p.clone();
                            q.push((v, o));
                            q
                        })
                    })
                    .collect();
            }
            for parts in partial {
                names.push(self.column_name(&parts));
                columns.push(Column { parts });
            }
        }
        Design { vars: self.vars.clone(), columns, names }
    }

    fn column_name(&self, parts: &[(usize, Option<u32>)]) -> String {
        if parts.is_empty() {
            return "Intercept".to_string();
        }
        parts
            .iter()
            .map(|&(v, level)| match (&self.vars[v], level) {
                (Variable::Factor { name, levels, .. }, Some(l)) => {
                    format!("{name}[T.{}]", levels[l as usize])
                }
                (var, _) => var.name().to_string(),
            })
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// A design: variables plus the expanded, named columns.
#[derive(Clone, Debug, PartialEq)]
pub struct Design {
    vars: Vec<Variable>,
    columns: Vec<Column>,
    names: Vec<String>,
}

impl Design {
    /// Number of covariate values each cell carries.
    pub fn n_vars(&self) -> usize {
        self.vars.len()
    }

    /// Number of columns (coefficients).
    pub fn n_columns(&self) -> usize {
        self.columns.len()
    }

    /// Column names in coefficient order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The cell value that stands for `level` of factor `var`.
    pub fn level(&self, var: VarId, level: &str) -> Result<f64, GlmError> {
        match &self.vars[var.0] {
            Variable::Factor { name, levels, .. } => levels
                .iter()
                .position(|l| l == level)
                .map(|i| i as f64)
                .ok_or_else(|| GlmError::UnknownLevel { factor: name.clone(), level: level.to_string() }),
            Variable::Numeric { name } => {
                Err(GlmError::UnknownLevel { factor: name.clone(), level: level.to_string() })
            }
        }
    }

    /// Writes the design row of one cell into `out` (length [`Design::n_columns`]).
    pub fn row(&self, values: &[f64], out: &mut [f64]) {
        for (x, col) in out.iter_mut().zip(&self.columns) {
            *x = col
                .parts
                .iter()
                .map(|&(v, level)| match level {
                    None => values[v],
                    Some(l) => (values[v] == l as f64) as u8 as f64,
                })
                .product();
        }
    }

    fn check_values(&self, values: &[f64]) -> Result<(), GlmError> {
        if values.len() != self.vars.len() {
            return Err(GlmError::WrongArity { expected: self.vars.len(), got: values.len() });
        }
        for (var, &value) in self.vars.iter().zip(values) {
            if let Variable::Factor { name, levels, .. } = var
                && !(value.fract() == 0.0 && (0.0..levels.len() as f64).contains(&value))
            {
                return Err(GlmError::InvalidLevelCode { factor: name.clone(), value });
            }
        }
        Ok(())
    }
}

/// Cell counts: covariate values (row-major, `n_vars` per cell), successes and trials.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cells {
    n_vars: usize,
    values: Vec<f64>,
    successes: Vec<f64>,
    trials: Vec<f64>,
}

impl Cells {
    pub fn new(n_vars: usize) -> Self {
        Cells { n_vars, ..Default::default() }
    }

    /// Adds a cell; counts may be fractional (frequency weights) but must satisfy
    /// 0 ≤ successes ≤ trials.
    pub fn push(&mut self, values: &[f64], successes: f64, trials: f64) -> Result<(), GlmError> {
        if values.len() != self.n_vars {
            return Err(GlmError::WrongArity { expected: self.n_vars, got: values.len() });
        }
        if !(successes.is_finite() && trials.is_finite() && 0.0 <= successes && successes <= trials) {
            return Err(GlmError::InvalidCounts { successes, trials });
        }
        self.values.extend_from_slice(values);
        self.successes.push(successes);
        self.trials.push(trials);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.trials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.trials.is_empty()
    }

    /// Covariate values of cell `i`.
    pub fn values(&self, i: usize) -> &[f64] {
        &self.values[i * self.n_vars..(i + 1) * self.n_vars]
    }

    pub fn successes(&self, i: usize) -> f64 {
        self.successes[i]
    }

    pub fn trials(&self, i: usize) -> f64 {
        self.trials[i]
    }
}

/// One coefficient or linear combination with its Wald test.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub estimate: f64,
    pub se: f64,
    /// estimate / se.
    pub z: f64,
    /// Two-sided normal p-value.
    pub pvalue: f64,
}

impl Estimate {
    fn wald(estimate: f64, variance: f64) -> Self {
        let se = variance.sqrt();
        let z = estimate / se;
        Estimate { estimate, se, z, pvalue: two_sided_normal_p(z) }
    }

    /// Wald confidence interval at level 1 − α (e.g. α = 0.05).
    pub fn conf_int(&self, alpha: f64) -> (f64, f64) {
        let q = statrs::function::erf::erfc_inv(alpha) * std::f64::consts::SQRT_2;
        (self.estimate - q * self.se, self.estimate + q * self.se)
    }
}

/// P(|Z| > |z|) for a standard normal Z, accurate in the far tail.
pub fn two_sided_normal_p(z: f64) -> f64 {
    erfc(z.abs() / std::f64::consts::SQRT_2)
}

/// A fitted model.
#[derive(Clone, Debug, PartialEq)]
pub struct GlmFit {
    design: Design,
    params: Vec<f64>,
    /// p×p row-major.
    cov: Vec<f64>,
    /// Bernoulli log-likelihood of the individual answers, Σ y·ln π + (n − y)·ln(1 − π): what
    /// statsmodels reports for the row-level fit the paper ran (no ln C(n, y) terms).
    pub loglike: f64,
    pub deviance: f64,
    pub iterations: usize,
    /// Total trials (observations).
    pub nobs: f64,
}

/// Iteration limit; Newton on the logit likelihood converges in well under 30 steps from the
/// statsmodels start unless the MLE does not exist.
const MAX_ITER: usize = 100;
/// A linear predictor beyond this means a fitted probability within 1e-15 of 0 or 1.
const SEPARATION_ETA: f64 = 35.0;
/// Relative pivot below which the information matrix counts as singular.
const PIVOT_TOL: f64 = 1e-10;

/// Fits the binomial-logit GLM by IRLS (Newton–Raphson, the canonical link makes them the same).
pub fn fit(design: &Design, cells: &Cells) -> Result<GlmFit, GlmError> {
    if cells.n_vars != design.n_vars() {
        return Err(GlmError::WrongArity { expected: design.n_vars(), got: cells.n_vars });
    }
    let p = design.n_columns();
    // Cells without trials carry no information; dropping them keeps the loops tight.
    let used: Vec<usize> = (0..cells.len()).filter(|&i| cells.trials[i] > 0.0).collect();
    if used.is_empty() || p == 0 {
        return Err(GlmError::NoData);
    }
    let m = used.len();
    let mut x = vec![0.0; m * p];
    let mut y = Vec::with_capacity(m);
    let mut n = Vec::with_capacity(m);
    for (r, &i) in used.iter().enumerate() {
        let values = cells.values(i);
        design.check_values(values)?;
        design.row(values, &mut x[r * p..(r + 1) * p]);
        y.push(cells.successes[i]);
        n.push(cells.trials[i]);
    }

    // statsmodels' start: μ = (y + ½)/(n + 1) per cell, then one weighted least-squares step.
    let mut eta: Vec<f64> = (0..m)
        .map(|r| {
            let mu = (y[r] + 0.5) / (n[r] + 1.0);
            (mu / (1.0 - mu)).ln()
        })
        .collect();
    let mut beta = vec![0.0; p];
    let mut info = vec![0.0; p * p];
    let mut rhs = vec![0.0; p];
    let mut new_beta = vec![0.0; p];
    let mut new_eta = vec![0.0; m];
    let mut dev = f64::INFINITY;
    let mut iterations = 0;
    let mut converged = false;

    while iterations < MAX_ITER {
        iterations += 1;
        // Working system: info·β_new = Xᵀ(W·η + y − nπ), written as a step from β so that near
        // convergence the right-hand side is the small score, not a difference of large terms.
        info.iter_mut().for_each(|a| *a = 0.0);
        rhs.iter_mut().for_each(|a| *a = 0.0);
        for r in 0..m {
            let pi = sigmoid(eta[r]);
            let w = n[r] * pi * (1.0 - pi);
            let xr = &x[r * p..(r + 1) * p];
            let offset = eta[r] - dot(xr, &beta);
            let t = w * offset + (y[r] - n[r] * pi);
            accumulate(&mut info, &mut rhs, xr, w, t, p);
        }
        let chol = cholesky(&info, p).map_err(|j| GlmError::Singular { column: design.names[j].clone() })?;
        let step = chol_solve(&chol, &rhs, p);

        // Step-halving guards the rare case where a full Newton step overshoots. The slack keeps
        // rounding noise in the deviance (near 0 for saturated models) from shrinking real steps.
        let mut scale = 1.0;
        let mut new_dev;
        loop {
            for j in 0..p {
                new_beta[j] = beta[j] + scale * step[j];
            }
            for r in 0..m {
                new_eta[r] = dot(&x[r * p..(r + 1) * p], &new_beta);
            }
            new_dev = deviance(&y, &n, &new_eta);
            if new_dev <= dev + 1e-9 * (1.0 + dev) || scale < 1e-3 || !dev.is_finite() {
                break;
            }
            scale *= 0.5;
        }
        // Judged on the full Newton step: a halved step says nothing about closeness to the MLE.
        let max_change = step.iter().zip(&new_beta).map(|(s, b)| s.abs() / (1.0 + b.abs())).fold(0.0, f64::max);
        beta.copy_from_slice(&new_beta);
        eta.copy_from_slice(&new_eta);
        dev = new_dev;
        if eta.iter().any(|e| e.abs() > SEPARATION_ETA) {
            return Err(GlmError::Separation);
        }
        // Newton converges quadratically: a step this small leaves an error below f64 precision.
        if max_change < 1e-10 && iterations > 1 {
            converged = true;
            break;
        }
    }
    if !converged {
        return Err(GlmError::NotConverged { iterations });
    }

    // Covariance and likelihood at the final estimate.
    info.iter_mut().for_each(|a| *a = 0.0);
    let mut loglike = 0.0;
    for r in 0..m {
        let pi = sigmoid(eta[r]);
        let w = n[r] * pi * (1.0 - pi);
        accumulate(&mut info, &mut rhs, &x[r * p..(r + 1) * p], w, 0.0, p);
        loglike += y[r] * log_sigmoid(eta[r]) + (n[r] - y[r]) * log_sigmoid(-eta[r]);
    }
    let chol = cholesky(&info, p).map_err(|j| GlmError::Singular { column: design.names[j].clone() })?;
    let cov = chol_inverse(&chol, p);
    Ok(GlmFit { design: design.clone(), params: beta, cov, loglike, deviance: dev, iterations, nobs: n.iter().sum() })
}

impl GlmFit {
    pub fn names(&self) -> &[String] {
        self.design.names()
    }

    pub fn params(&self) -> &[f64] {
        &self.params
    }

    /// Covariance of coefficients `i` and `j`.
    pub fn cov(&self, i: usize, j: usize) -> f64 {
        self.cov[i * self.params.len() + j]
    }

    /// Position of a coefficient by name.
    pub fn index(&self, name: &str) -> Result<usize, GlmError> {
        self.design.names.iter().position(|n| n == name).ok_or_else(|| GlmError::UnknownCoefficient(name.to_string()))
    }

    /// Coefficient `i` with SE, z and p.
    pub fn estimate(&self, i: usize) -> Estimate {
        Estimate::wald(self.params[i], self.cov(i, i))
    }

    /// Coefficient by name.
    pub fn coef(&self, name: &str) -> Result<Estimate, GlmError> {
        Ok(self.estimate(self.index(name)?))
    }

    /// All coefficients with their names, in column order.
    pub fn summary(&self) -> Vec<(String, Estimate)> {
        (0..self.params.len()).map(|i| (self.design.names[i].clone(), self.estimate(i))).collect()
    }

    /// wᵀβ with SE √(wᵀVw), Wald z and two-sided p.
    pub fn lincomb(&self, weights: &[f64]) -> Result<Estimate, GlmError> {
        let p = self.params.len();
        if weights.len() != p {
            return Err(GlmError::WrongLength { expected: p, got: weights.len() });
        }
        Ok(Estimate::wald(dot(weights, &self.params), self.quadratic_form(weights)))
    }

    /// [`GlmFit::lincomb`] with weights given by coefficient name (others 0), e.g.
    /// `[("ft", 1.0), ("ft:amendment[T.emotion]", 1.0)]` for the effect of ft under emotion.
    pub fn lincomb_named(&self, terms: &[(&str, f64)]) -> Result<Estimate, GlmError> {
        let mut w = vec![0.0; self.params.len()];
        for &(name, weight) in terms {
            w[self.index(name)?] += weight;
        }
        self.lincomb(&w)
    }

    /// Predicted probability for one covariate row.
    pub fn predict(&self, values: &[f64]) -> Result<f64, GlmError> {
        self.design.check_values(values)?;
        let mut row = vec![0.0; self.params.len()];
        self.design.row(values, &mut row);
        Ok(sigmoid(dot(&row, &self.params)))
    }

    /// The paper's counterfactual average marginal effect of a numeric (0/1) variable: the mean
    /// over all answers (cells weighted by trials) of p̂(var = 1) − p̂(var = 0).
    pub fn average_marginal_effect(&self, cells: &Cells, var: VarId) -> Result<f64, GlmError> {
        self.average_contrast(cells, var, 1.0, 0.0, |_| true)
    }

    /// Mean over the answers of the included cells (weighted by trials) of
    /// p̂(var = `to`) − p̂(var = `from`), every other covariate kept as observed. With a
    /// factor, `to`/`from` are level values from [`Design::level`]. `include` sees each cell's
    /// covariate values; it selects e.g. one amendment for a per-context effect.
    pub fn average_contrast(
        &self,
        cells: &Cells,
        var: VarId,
        to: f64,
        from: f64,
        include: impl Fn(&[f64]) -> bool,
    ) -> Result<f64, GlmError> {
        Ok(self.average_contrast_estimate(cells, var, to, from, include)?.estimate)
    }

    /// [`GlmFit::average_contrast`] with its delta-method standard error under this fit's
    /// covariance (as statsmodels' `get_margeff(dummy=True)` computes it): the gradient of the
    /// mean contrast is the trial-weighted mean of π₁(1 − π₁)x₁ − π₀(1 − π₀)x₀.
    pub fn average_contrast_estimate(
        &self,
        cells: &Cells,
        var: VarId,
        to: f64,
        from: f64,
        include: impl Fn(&[f64]) -> bool,
    ) -> Result<Estimate, GlmError> {
        if var.0 >= self.design.n_vars() {
            return Err(GlmError::WrongLength { expected: self.design.n_vars(), got: var.0 + 1 });
        }
        let p = self.params.len();
        let mut scratch = vec![0.0; self.design.n_vars()];
        let (mut hi_row, mut lo_row) = (vec![0.0; p], vec![0.0; p]);
        let mut gradient = vec![0.0; p];
        let (mut total, mut weight) = (0.0, 0.0);
        for i in 0..cells.len() {
            let trials = cells.trials(i);
            if trials == 0.0 || !include(cells.values(i)) {
                continue;
            }
            scratch.copy_from_slice(cells.values(i));
            scratch[var.0] = to;
            self.design.check_values(&scratch)?;
            self.design.row(&scratch, &mut hi_row);
            let hi = sigmoid(dot(&hi_row, &self.params));
            scratch[var.0] = from;
            self.design.check_values(&scratch)?;
            self.design.row(&scratch, &mut lo_row);
            let lo = sigmoid(dot(&lo_row, &self.params));
            total += trials * (hi - lo);
            weight += trials;
            for j in 0..p {
                gradient[j] += trials * (hi * (1.0 - hi) * hi_row[j] - lo * (1.0 - lo) * lo_row[j]);
            }
        }
        if weight == 0.0 {
            return Err(GlmError::NoData);
        }
        gradient.iter_mut().for_each(|g| *g /= weight);
        Ok(Estimate::wald(total / weight, self.quadratic_form(&gradient)))
    }

    /// wᵀVw.
    fn quadratic_form(&self, w: &[f64]) -> f64 {
        let p = self.params.len();
        let mut variance = 0.0;
        for i in 0..p {
            if w[i] != 0.0 {
                variance += w[i] * dot(&self.cov[i * p..(i + 1) * p], w);
            }
        }
        variance
    }

    /// The same fit with the cluster-robust (sandwich) covariance in place of the model-based
    /// one; every estimate, linear combination and marginal effect of the result uses it.
    ///
    /// `rows` are the answers split by cluster: each row holds one cluster's trials and
    /// successes in one covariate cell, `clusters[i]` is row i's cluster id, and the rows summed
    /// per covariate cell must be the cells this fit was made from (statsmodels' row-level fit
    /// with `groups`). Needs at least two clusters.
    pub fn cluster_robust(&self, rows: &Cells, clusters: &[u64]) -> Result<GlmFit, GlmError> {
        if rows.len() != clusters.len() {
            return Err(GlmError::Cluster(format!("{} rows but {} cluster ids", rows.len(), clusters.len())));
        }
        let members = clusters.iter().enumerate().map(|(i, &c)| (c, i, rows.successes(i), rows.trials(i)));
        self.cluster_robust_grouped(rows, members)
    }

    /// [`GlmFit::cluster_robust`] for rows that share covariate cells: each member is
    /// (cluster id, index of its covariate cell in `cells`, successes, trials), so millions of
    /// item-level rows need their covariates (and fitted probability) worked out only once per
    /// cell. Only `cells`' covariate values are read.
    pub fn cluster_robust_grouped(
        &self,
        cells: &Cells,
        members: impl IntoIterator<Item = (u64, usize, f64, f64)>,
    ) -> Result<GlmFit, GlmError> {
        if cells.n_vars != self.design.n_vars() {
            return Err(GlmError::WrongArity { expected: self.design.n_vars(), got: cells.n_vars });
        }
        let p = self.params.len();
        // Each cell's non-zero design entries and fitted probability, worked out when first used.
        let mut x = vec![0.0; p];
        type CellFit = (Vec<(usize, f64)>, f64);
        let mut of_cell: Vec<Option<CellFit>> = vec![None; cells.len()];
        // Scores by cluster, in order of first appearance; summed into the meat in cluster-id
        // order, so the SEs are reproducible to the last bit whatever the row order.
        let mut index: std::collections::HashMap<u64, usize, foldhash::fast::FixedState> = Default::default();
        let mut ids: Vec<u64> = Vec::new();
        let mut scores: Vec<f64> = Vec::new();
        let mut nobs = 0.0;
        for (cluster, cell, successes, trials) in members {
            if trials == 0.0 {
                continue;
            }
            if cell >= cells.len() {
                return Err(GlmError::Cluster(format!("cell {cell} of {}", cells.len())));
            }
            let (nonzero, pi) = match &of_cell[cell] {
                Some(c) => c,
                None => {
                    self.design.check_values(cells.values(cell))?;
                    self.design.row(cells.values(cell), &mut x);
                    let pi = sigmoid(dot(&x, &self.params));
                    let nonzero = x.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(j, v)| (j, *v)).collect();
                    of_cell[cell].insert((nonzero, pi))
                }
            };
            let residual = successes - trials * pi;
            let next = ids.len();
            let g = *index.entry(cluster).or_insert(next);
            if g == next {
                ids.push(cluster);
                scores.resize(scores.len() + p, 0.0);
            }
            let s = &mut scores[g * p..(g + 1) * p];
            for &(j, v) in nonzero {
                s[j] += v * residual;
            }
            nobs += trials;
        }
        let g = ids.len() as f64;
        if g < 2.0 {
            return Err(GlmError::Cluster(format!("{} cluster(s); at least two are needed", ids.len())));
        }
        if (nobs - self.nobs).abs() > 1e-9 * self.nobs.max(1.0) {
            return Err(GlmError::Cluster(format!("rows hold {nobs} answers, the fit {}", self.nobs)));
        }
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_unstable_by_key(|&i| ids[i]);
        // Meat Σ_g s_g s_gᵀ, then bread·meat·bread with the model-based covariance as bread.
        let mut meat = vec![0.0; p * p];
        for s in order.iter().map(|&g| &scores[g * p..(g + 1) * p]) {
            for i in 0..p {
                for j in 0..p {
                    meat[i * p + j] += s[i] * s[j];
                }
            }
        }
        let correction = g / (g - 1.0) * (nobs - 1.0) / (nobs - p as f64);
        let bread = &self.cov;
        let mut half = vec![0.0; p * p];
        for i in 0..p {
            for k in 0..p {
                let b = bread[i * p + k];
                if b != 0.0 {
                    for j in 0..p {
                        half[i * p + j] += b * meat[k * p + j];
                    }
                }
            }
        }
        let mut cov = vec![0.0; p * p];
        for i in 0..p {
            for k in 0..p {
                let h = half[i * p + k];
                if h != 0.0 {
                    for j in 0..p {
                        cov[i * p + j] += h * bread[k * p + j];
                    }
                }
            }
        }
        for i in 0..p {
            for j in i..p {
                let v = correction * 0.5 * (cov[i * p + j] + cov[j * p + i]);
                cov[i * p + j] = v;
                cov[j * p + i] = v;
            }
        }
        Ok(GlmFit { cov, ..self.clone() })
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Adds w·x·xᵀ to the upper triangle of `info` and t·x to `rhs`.
fn accumulate(info: &mut [f64], rhs: &mut [f64], x: &[f64], w: f64, t: f64, p: usize) {
    for i in 0..p {
        if x[i] == 0.0 {
            continue;
        }
        let wxi = w * x[i];
        rhs[i] += t * x[i];
        let row = &mut info[i * p..(i + 1) * p];
        for j in i..p {
            row[j] += wxi * x[j];
        }
    }
}

fn sigmoid(eta: f64) -> f64 {
    if eta >= 0.0 {
        1.0 / (1.0 + (-eta).exp())
    } else {
        let e = eta.exp();
        e / (1.0 + e)
    }
}

/// ln σ(η) without overflow or loss of precision in either tail.
fn log_sigmoid(eta: f64) -> f64 {
    if eta >= 0.0 { -(-eta).exp().ln_1p() } else { eta - eta.exp().ln_1p() }
}

/// Binomial deviance 2·Σ [y ln(y/μ) + (n−y) ln((n−y)/(n−μ))], with 0·ln 0 = 0.
fn deviance(y: &[f64], n: &[f64], eta: &[f64]) -> f64 {
    let mut d = 0.0;
    for r in 0..y.len() {
        let (yr, nr) = (y[r], n[r]);
        // ln μ = ln n + ln σ(η) and ln(n − μ) = ln n + ln σ(−η), stable for extreme η.
        if yr > 0.0 {
            d += yr * ((yr / nr).ln() - log_sigmoid(eta[r]));
        }
        if nr - yr > 0.0 {
            d += (nr - yr) * (((nr - yr) / nr).ln() - log_sigmoid(-eta[r]));
        }
    }
    2.0 * d
}

/// Cholesky factor L (row-major, lower) of a symmetric matrix given by its upper triangle.
/// Err(j) names the first column whose pivot is not clearly positive.
fn cholesky(a: &[f64], p: usize) -> Result<Vec<f64>, usize> {
    let mut l = vec![0.0; p * p];
    for j in 0..p {
        let ajj = a[j * p + j];
        let mut d = ajj;
        for k in 0..j {
            d -= l[j * p + k] * l[j * p + k];
        }
        // Written so that a NaN pivot also fails.
        let positive = d > PIVOT_TOL * ajj.abs() && d > 0.0;
        if !positive {
            return Err(j);
        }
        let ljj = d.sqrt();
        l[j * p + j] = ljj;
        for i in j + 1..p {
            let mut s = a[j * p + i];
            for k in 0..j {
                s -= l[i * p + k] * l[j * p + k];
            }
            l[i * p + j] = s / ljj;
        }
    }
    Ok(l)
}

/// Solves L·Lᵀ·x = b.
fn chol_solve(l: &[f64], b: &[f64], p: usize) -> Vec<f64> {
    let mut x = b.to_vec();
    for i in 0..p {
        for k in 0..i {
            x[i] -= l[i * p + k] * x[k];
        }
        x[i] /= l[i * p + i];
    }
    for i in (0..p).rev() {
        for k in i + 1..p {
            x[i] -= l[k * p + i] * x[k];
        }
        x[i] /= l[i * p + i];
    }
    x
}

/// (L·Lᵀ)⁻¹ as a full symmetric row-major matrix.
fn chol_inverse(l: &[f64], p: usize) -> Vec<f64> {
    let mut inv = vec![0.0; p * p];
    let mut e = vec![0.0; p];
    for j in 0..p {
        e.iter_mut().for_each(|v| *v = 0.0);
        e[j] = 1.0;
        let col = chol_solve(l, &e, p);
        for i in 0..p {
            inv[i * p + j] = col[i];
        }
    }
    // Symmetrise so that V[i][j] and V[j][i] are bit-identical.
    for i in 0..p {
        for j in i + 1..p {
            let v = 0.5 * (inv[i * p + j] + inv[j * p + i]);
            inv[i * p + j] = v;
            inv[j * p + i] = v;
        }
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * a.abs().max(b.abs())
    }

    /// `value` rounds to `printed` at `decimals` decimal places (half a unit of the last digit,
    /// plus a hair for the binary representation of the printed number).
    #[track_caller]
    fn assert_printed(value: f64, printed: f64, decimals: i32) {
        let half_unit = 0.5 * 10f64.powi(-decimals) * (1.0 + 1e-9);
        assert!((value - printed).abs() <= half_unit, "{value} does not round to {printed} at {decimals} decimals");
    }

    #[track_caller]
    fn assert_close(a: f64, b: f64, tol: f64) {
        assert!(close(a, b, tol), "{a} vs {b} (rel {})", (a - b).abs() / b.abs());
    }

    fn two_by_two() -> (Design, Cells) {
        let mut d = DesignBuilder::new();
        let ft = d.numeric("ft");
        d.intercept().term(&[ft]);
        let design = d.build();
        let mut cells = Cells::new(1);
        cells.push(&[0.0], 30.0, 100.0).unwrap();
        cells.push(&[1.0], 45.0, 100.0).unwrap();
        (design, cells)
    }

    #[test]
    fn cluster_robust_intercept_only_by_hand() {
        // Three clusters of two answers: (1, 1), (0, 0), (1, 0). π̂ = ½, information 6·¼ = 1.5,
        // cluster scores 1, −1, 0, so V = c·2/1.5² with c = 3/2 · 5/5: SE = √(4/3).
        let mut d = DesignBuilder::new();
        d.intercept();
        let design = d.build();
        let mut cells = Cells::new(0);
        cells.push(&[], 3.0, 6.0).unwrap();
        let m = fit(&design, &cells).unwrap();
        let mut rows = Cells::new(0);
        for y in [2.0, 0.0, 1.0] {
            rows.push(&[], y, 2.0).unwrap();
        }
        let robust = m.cluster_robust(&rows, &[7, 8, 9]).unwrap();
        assert_close(robust.coef("Intercept").unwrap().se, (4.0f64 / 3.0).sqrt(), 1e-12);
        assert_close(m.coef("Intercept").unwrap().se, (1.0f64 / 1.5).sqrt(), 1e-12);
        // The estimate is the same; only the covariance changes.
        assert_eq!(robust.params(), m.params());
        // The same answers split differently (one row per answer, same clusters) give the same V.
        let mut single = Cells::new(0);
        for y in [1.0, 1.0, 0.0, 0.0, 1.0, 0.0] {
            single.push(&[], y, 1.0).unwrap();
        }
        let again = m.cluster_robust(&single, &[7, 7, 8, 8, 9, 9]).unwrap();
        assert_close(again.coef("Intercept").unwrap().se, (4.0f64 / 3.0).sqrt(), 1e-12);
        // Fewer than two clusters, mismatched ids or rows that are not the fit's answers are errors.
        assert!(matches!(m.cluster_robust(&rows, &[1, 1, 1]), Err(GlmError::Cluster(_))));
        assert!(matches!(m.cluster_robust(&rows, &[1, 2]), Err(GlmError::Cluster(_))));
        let mut short = Cells::new(0);
        short.push(&[], 1.0, 2.0).unwrap();
        short.push(&[], 1.0, 2.0).unwrap();
        assert!(matches!(m.cluster_robust(&short, &[1, 2]), Err(GlmError::Cluster(_))));
    }

    #[test]
    fn cluster_robust_with_one_answer_per_cluster_is_the_scaled_model_covariance() {
        // Saturated 2×2: with singleton clusters the meat equals the information, so
        // V = c·I⁻¹ with c = N/(N − 1)·(N − 1)/(N − K) = 200/198.
        let (design, cells) = two_by_two();
        let m = fit(&design, &cells).unwrap();
        let mut rows = Cells::new(1);
        let mut ids = Vec::new();
        for (ft, wrong) in [(0.0, 30), (1.0, 45)] {
            for i in 0..100 {
                rows.push(&[ft], if i < wrong { 1.0 } else { 0.0 }, 1.0).unwrap();
                ids.push(ids.len() as u64);
            }
        }
        let robust = m.cluster_robust(&rows, &ids).unwrap();
        let scale = (200.0f64 / 198.0).sqrt();
        for name in ["Intercept", "ft"] {
            assert_close(robust.coef(name).unwrap().se, m.coef(name).unwrap().se * scale, 1e-12);
        }
    }

    #[test]
    fn average_marginal_effect_standard_error_by_hand() {
        // Saturated: the AME is p̂₁ − p̂₀ and its delta-method SE is √(p₁q₁/n₁ + p₀q₀/n₀).
        let (design, cells) = two_by_two();
        let m = fit(&design, &cells).unwrap();
        let e = m.average_contrast_estimate(&cells, VarId(0), 1.0, 0.0, |_| true).unwrap();
        assert_close(e.estimate, 0.15, 1e-12);
        assert_close(e.se, (0.45 * 0.55 / 100.0 + 0.3 * 0.7 / 100.0f64).sqrt(), 1e-10);
    }

    #[test]
    fn oracle_closed_form_two_by_two() {
        let (design, cells) = two_by_two();
        let m = fit(&design, &cells).unwrap();
        assert_eq!(m.names(), ["Intercept", "ft"]);
        let b0 = m.coef("Intercept").unwrap();
        let bft = m.coef("ft").unwrap();
        assert_close(b0.estimate, (30.0f64 / 70.0).ln(), 1e-12);
        assert_close(bft.estimate, ((45.0 / 55.0) / (30.0 / 70.0f64)).ln(), 1e-12);
        assert_close(bft.se, (1.0 / 30.0 + 1.0 / 70.0 + 1.0 / 45.0 + 1.0 / 55.0f64).sqrt(), 1e-12);
        assert_close(b0.se, (1.0 / 30.0 + 1.0 / 70.0f64).sqrt(), 1e-12);
        assert_printed(b0.estimate, -0.847298, 6);
        assert_printed(bft.estimate, 0.646627, 6);
        assert_printed(bft.se, 0.296687, 6);
        assert_printed(b0.se, 0.218218, 6);
        let ll = 30.0 * 0.3f64.ln() + 70.0 * 0.7f64.ln() + 45.0 * 0.45f64.ln() + 55.0 * 0.55f64.ln();
        assert_close(m.loglike, ll, 1e-12);
        assert_printed(m.loglike, -129.900312, 6);
        assert!(m.deviance.abs() < 1e-9, "saturated model deviance {}", m.deviance);
        assert_eq!(m.nobs, 200.0);
    }

    fn fixed_effects() -> (Design, Cells, VarId) {
        let mut d = DesignBuilder::new();
        let ft = d.numeric("ft");
        let dataset = d.factor("dataset", &["disinfo", "trivia"], "disinfo").unwrap();
        let model = d.factor("model", &["A", "B"], "A").unwrap();
        d.intercept().term(&[ft]).term(&[dataset]).term(&[model]);
        let design = d.build();
        let mut cells = Cells::new(3);
        for (m, ds, base, warm) in [
            ("A", "disinfo", 10.0, 18.0),
            ("A", "trivia", 15.0, 22.0),
            ("B", "disinfo", 8.0, 12.0),
            ("B", "trivia", 20.0, 30.0),
        ] {
            let ds = design.level(dataset, ds).unwrap();
            let m = design.level(model, m).unwrap();
            cells.push(&[0.0, ds, m], base, 50.0).unwrap();
            cells.push(&[1.0, ds, m], warm, 50.0).unwrap();
        }
        (design, cells, ft)
    }

    #[test]
    fn oracle_fixed_effects_non_saturated() {
        let (design, cells, ft) = fixed_effects();
        let m = fit(&design, &cells).unwrap();
        assert_eq!(m.names(), ["Intercept", "ft", "dataset[T.trivia]", "model[T.B]"]);
        // (coef, SE, z, p) as printed in ORACLES.md §3: agree to the printed digits.
        let printed = [
            ("Intercept", -1.587705, 0.240637, -6.5979, 4.169e-11),
            ("ft", 0.686974, 0.220633, 3.1137, 0.0018479),
            ("dataset[T.trivia]", 0.914861, 0.221790, 4.1249, 3.709e-05),
            ("model[T.B]", 0.119834, 0.219029, 0.5471, 0.584302),
        ];
        for (name, coef, se, z, p) in printed {
            let e = m.coef(name).unwrap();
            assert_printed(e.estimate, coef, 6);
            assert_printed(e.se, se, 6);
            assert_printed(e.z, z, 4);
            assert_close(e.pvalue, p, 2e-4);
        }
        // The same MLE to 17 digits from an independent 50-digit Newton iteration (mpmath), so
        // the fit is checked far beyond the printed digits.
        let precise = [
            (-1.5877052178320399, 0.24063681998414865, 4.169342406275378e-11),
            (0.6869738172788299, 0.22063270603446666, 0.001847863043833347),
            (0.914861367312311, 0.22179021061267085, 3.709036632417861e-05),
            (0.11983367037906824, 0.2190293655145521, 0.5843015496934669),
        ];
        for (j, (coef, se, p)) in precise.into_iter().enumerate() {
            let e = m.estimate(j);
            assert_close(e.estimate, coef, 1e-12);
            assert_close(e.se, se, 1e-12);
            assert_close(e.pvalue, p, 1e-10);
        }
        assert_close(m.loglike, -242.05763989677159, 1e-13);
        assert_close(m.loglike, -242.05764, 1e-8);
        let ft_coef = m.coef("ft").unwrap();
        assert_close(ft_coef.estimate.exp(), 1.98769, 1e-5);
        let (lo, hi) = ft_coef.conf_int(0.05);
        assert_close(lo.exp(), 1.28987, 1e-5);
        assert_close(hi.exp(), 3.06303, 1e-5);
        let ame = m.average_marginal_effect(&cells, ft).unwrap();
        assert_close(ame, 82.0 / 200.0 - 53.0 / 200.0, 1e-10);
    }

    #[test]
    fn fixed_effects_satisfy_the_score_equations() {
        // At the MLE with a canonical link, Xᵀ(y − μ) = 0: fitted totals match observed totals
        // in every column's margin (to the solver's precision).
        let (design, cells, _) = fixed_effects();
        let m = fit(&design, &cells).unwrap();
        let mut row = vec![0.0; design.n_columns()];
        let mut score = vec![0.0; design.n_columns()];
        for i in 0..cells.len() {
            design.row(cells.values(i), &mut row);
            let mu = cells.trials(i) * m.predict(cells.values(i)).unwrap();
            for j in 0..row.len() {
                score[j] += row[j] * (cells.successes(i) - mu);
            }
        }
        assert!(score.iter().all(|s| s.abs() < 1e-9), "{score:?}");
    }

    #[test]
    fn oracle_interaction_and_linear_combination() {
        let mut d = DesignBuilder::new();
        let ft = d.numeric("ft");
        let belief = d.numeric("belief");
        d.intercept().term(&[ft]).term(&[belief]).term(&[ft, belief]);
        let design = d.build();
        assert_eq!(design.names(), ["Intercept", "ft", "belief", "ft:belief"]);
        let mut cells = Cells::new(2);
        for (f, b, k) in [(0.0, 0.0, 30.0), (1.0, 0.0, 45.0), (0.0, 1.0, 40.0), (1.0, 1.0, 65.0)] {
            cells.push(&[f, b], k, 100.0).unwrap();
        }
        let m = fit(&design, &cells).unwrap();
        let beta = [
            (30.0f64 / 70.0).ln(),
            ((45.0 / 55.0) / (30.0 / 70.0f64)).ln(),
            ((40.0 / 60.0) / (30.0 / 70.0f64)).ln(),
            ((65.0 / 35.0) / (40.0 / 60.0) / ((45.0 / 55.0) / (30.0 / 70.0f64))).ln(),
        ];
        let inv = |k: [f64; 4]| k.iter().map(|v| 1.0 / v).sum::<f64>().sqrt();
        let se = [
            inv([30.0, 70.0, f64::INFINITY, f64::INFINITY]),
            inv([30.0, 70.0, 45.0, 55.0]),
            inv([30.0, 70.0, 40.0, 60.0]),
            (1.0 / 30.0 + 1.0 / 70.0 + 1.0 / 45.0 + 1.0 / 55.0 + 1.0 / 40.0 + 1.0 / 60.0 + 1.0 / 65.0 + 1.0 / 35.0f64)
                .sqrt(),
        ];
        let printed_beta = [-0.847298, 0.646627, 0.441833, 0.377877];
        let printed_se = [0.218218, 0.296687, 0.298807, 0.416708];
        for j in 0..4 {
            let e = m.estimate(j);
            assert_close(e.estimate, beta[j], 1e-10);
            assert_close(e.se, se[j], 1e-10);
            assert_printed(e.estimate, printed_beta[j], 6);
            assert_printed(e.se, printed_se[j], 6);
        }
        let effect = m.lincomb_named(&[("ft", 1.0), ("ft:belief", 1.0)]).unwrap();
        assert_close(effect.estimate, ((65.0 / 35.0) / (40.0 / 60.0f64)).ln(), 1e-10);
        assert_printed(effect.estimate, 1.024504, 6);
        let closed_se = (1.0 / 65.0 + 1.0 / 35.0 + 1.0 / 40.0 + 1.0 / 60.0f64).sqrt();
        assert_close(effect.se, closed_se, 1e-10);
        assert_printed(effect.se, 0.292614, 6);
        assert_printed(effect.z, 3.5012, 4);
        assert_close(effect.pvalue, 4.6313e-4, 1e-4);
        // The same combination through explicit weights and through V directly.
        let by_weights = m.lincomb(&[0.0, 1.0, 0.0, 1.0]).unwrap();
        assert_eq!(by_weights, effect);
        let v = m.cov(1, 1) + m.cov(3, 3) + 2.0 * m.cov(1, 3);
        assert_close(effect.se, v.sqrt(), 1e-12);
    }

    #[test]
    fn factor_interactions_are_named_and_fit_like_the_saturated_model() {
        let mut d = DesignBuilder::new();
        let ft = d.numeric("ft");
        let amendment = d.factor("amendment", &["emotion", "unmodified", "stake"], "unmodified").unwrap();
        d.intercept().term(&[ft]).term(&[amendment]).term(&[ft, amendment]);
        let design = d.build();
        assert_eq!(
            design.names(),
            [
                "Intercept",
                "ft",
                "amendment[T.emotion]",
                "amendment[T.stake]",
                "ft:amendment[T.emotion]",
                "ft:amendment[T.stake]"
            ]
        );
        let counts = [("unmodified", 30.0, 45.0), ("emotion", 35.0, 60.0), ("stake", 28.0, 33.0)];
        let mut cells = Cells::new(2);
        for (a, base, warm) in counts {
            let a = design.level(amendment, a).unwrap();
            cells.push(&[0.0, a], base, 100.0).unwrap();
            cells.push(&[1.0, a], warm, 100.0).unwrap();
        }
        let m = fit(&design, &cells).unwrap();
        let logit = |k: f64| (k / (100.0 - k)).ln();
        for (a, base, warm) in counts {
            let mut terms = vec![("ft", 1.0)];
            let name = format!("ft:amendment[T.{a}]");
            if a != "unmodified" {
                terms.push((name.as_str(), 1.0));
            }
            let effect = m.lincomb_named(&terms).unwrap();
            assert_close(effect.estimate, logit(warm) - logit(base), 1e-10);
            let se = (1.0 / base + 1.0 / (100.0 - base) + 1.0 / warm + 1.0 / (100.0 - warm)).sqrt();
            assert_close(effect.se, se, 1e-10);
            // Per-context counterfactual AME equals the raw difference in a saturated model.
            let level = design.level(amendment, a).unwrap();
            let ame = m.average_contrast(&cells, ft, 1.0, 0.0, |v| v[1] == level).unwrap();
            assert_close(ame, (warm - base) / 100.0, 1e-10);
        }
    }

    #[test]
    fn paper_sized_design_recovers_known_coefficients() {
        // M3's shape: 5 models × 4 datasets × 9 amendments × ft, ~440k answers, counts set to
        // n·σ(η) for known β (fractional counts are allowed), so the MLE is exactly that β.
        let amendments = [
            "unmodified",
            "emotion:anger",
            "emotion:happy",
            "emotion:sad",
            "relation:close",
            "relation:hierarchical_down",
            "relation:hierarchical_up",
            "stake:high",
            "stake:low",
        ];
        let datasets = ["disinfo", "medqa", "trivia", "truthfulqa"];
        let models = ["8b", "gpt-4o", "mistral", "qwen-32", "70b"];
        let mut d = DesignBuilder::new();
        let ft = d.numeric("ft");
        let am = d.factor("amendment", &amendments, "unmodified").unwrap();
        let ds = d.factor("dataset", &datasets, "disinfo").unwrap();
        let md = d.factor("model", &models, "8b").unwrap();
        d.intercept().term(&[ft]).term(&[am]).term(&[ds]).term(&[ft, am]).term(&[md]);
        let design = d.build();
        assert_eq!(design.n_columns(), 1 + 1 + 8 + 3 + 8 + 4);
        let truth: Vec<f64> = (0..design.n_columns()).map(|j| ((j * 37 % 23) as f64 - 11.0) / 20.0).collect();
        let mut cells = Cells::new(4);
        let mut row = vec![0.0; design.n_columns()];
        for f in 0..2 {
            for a in 0..amendments.len() {
                for dd in 0..datasets.len() {
                    for mm in 0..models.len() {
                        let v = [f as f64, a as f64, dd as f64, mm as f64];
                        design.row(&v, &mut row);
                        let n = 1200.0 + ((f + a + dd + mm) % 5) as f64 * 10.0;
                        cells.push(&v, n * sigmoid(dot(&row, &truth)), n).unwrap();
                    }
                }
            }
        }
        let m = fit(&design, &cells).unwrap();
        assert!(m.nobs > 430_000.0 && m.nobs < 450_000.0);
        for (j, (&got, &want)) in m.params().iter().zip(&truth).enumerate() {
            assert!((got - want).abs() < 1e-9, "{}: {got} vs {want}", m.names()[j]);
        }
        assert!(m.deviance.abs() < 1e-6, "deviance {}", m.deviance);
        assert!(m.iterations < 15, "{} iterations", m.iterations);
        // Covariance is symmetric positive definite: every variance positive.
        for i in 0..design.n_columns() {
            assert!(m.cov(i, i) > 0.0);
            for j in 0..design.n_columns() {
                assert_eq!(m.cov(i, j), m.cov(j, i));
            }
        }
    }

    #[test]
    fn factor_by_factor_interaction_names() {
        let mut d = DesignBuilder::new();
        let a = d.factor("a", &["x", "y", "z"], "x").unwrap();
        let b = d.factor("b", &["u", "v"], "u").unwrap();
        d.intercept().term(&[a]).term(&[b]).term(&[a, b]);
        assert_eq!(d.build().names(), ["Intercept", "a[T.y]", "a[T.z]", "b[T.v]", "a[T.y]:b[T.v]", "a[T.z]:b[T.v]"]);
    }

    #[test]
    fn separation_is_an_error_not_garbage() {
        let (design, _) = two_by_two();
        let mut cells = Cells::new(1);
        cells.push(&[0.0], 30.0, 100.0).unwrap();
        cells.push(&[1.0], 0.0, 100.0).unwrap();
        assert_eq!(fit(&design, &cells), Err(GlmError::Separation));
    }

    #[test]
    fn empty_level_is_reported_as_singular_with_its_column() {
        let mut d = DesignBuilder::new();
        let ds = d.factor("dataset", &["disinfo", "trivia", "medqa"], "disinfo").unwrap();
        d.intercept().term(&[ds]);
        let design = d.build();
        let mut cells = Cells::new(1);
        cells.push(&[0.0], 10.0, 50.0).unwrap();
        cells.push(&[1.0], 20.0, 50.0).unwrap();
        assert_eq!(fit(&design, &cells), Err(GlmError::Singular { column: "dataset[T.medqa]".to_string() }));
    }

    #[test]
    fn redundant_term_is_singular() {
        let mut d = DesignBuilder::new();
        let ft = d.numeric("ft");
        d.intercept().term(&[ft]).term(&[ft]);
        let design = d.build();
        let mut cells = Cells::new(1);
        cells.push(&[0.0], 30.0, 100.0).unwrap();
        cells.push(&[1.0], 45.0, 100.0).unwrap();
        assert!(matches!(fit(&design, &cells), Err(GlmError::Singular { .. })));
    }

    #[test]
    fn invalid_input_is_rejected() {
        let mut d = DesignBuilder::new();
        assert!(matches!(d.factor("dataset", &["a", "b"], "c"), Err(GlmError::UnknownReference { .. })));
        assert!(matches!(d.factor("dataset", &["a", "a"], "a"), Err(GlmError::DuplicateLevel { .. })));
        let ds = d.factor("dataset", &["a", "b"], "a").unwrap();
        d.intercept().term(&[ds]);
        let design = d.build();
        assert!(design.level(ds, "zzz").is_err());
        let mut cells = Cells::new(1);
        assert!(cells.push(&[0.0], 5.0, 4.0).is_err());
        assert!(cells.push(&[0.0, 1.0], 1.0, 4.0).is_err());
        cells.push(&[2.0], 1.0, 4.0).unwrap();
        assert!(matches!(fit(&design, &cells), Err(GlmError::InvalidLevelCode { .. })));
        assert_eq!(fit(&design, &Cells::new(1)), Err(GlmError::NoData));
    }

    #[test]
    fn zero_trial_cells_are_ignored() {
        let (design, mut cells) = two_by_two();
        let before = fit(&design, &cells).unwrap();
        cells.push(&[1.0], 0.0, 0.0).unwrap();
        let after = fit(&design, &cells).unwrap();
        assert_eq!(before.params(), after.params());
    }
}
