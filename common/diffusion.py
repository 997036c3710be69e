"""Noise schedules, training losses and samplers shared by every diffusion model in this project.

One `Diffusion` object fixes the forward process and the sampler:

* `ddpm` / `ddim`: discrete VP schedule (cosine or linear) with `train_steps` noise levels; sampling may stride,
  evenly or (`spacing="quadratic"`, also for `fm`'s time grid) densest near the data.
  DDPM is the generalised DDIM step with eta = 1, i.e. the ancestral posterior q(x_{k'} | x_k, x0_hat).
* `sm`: continuous linear VP-SDE, reverse-time SDE from t = 1 to t_min: by default its exponential-integrator
  discretisation (`sde_solver="exponential"`: each step draws from the exact Gaussian q(x_s | x_t, x0 = x0_hat), the
  continuous-time DDPM posterior, on a logSNR-uniform grid), or by Euler-Maruyama on a time-uniform grid
  (`sde_solver="euler"`: x + h (beta x / 2 + beta score) + sqrt(h beta) z, which needs hundreds of steps: at 10 and
  20 steps it misses a narrow Gaussian's std by +375% and +18%, the exponential step by -33% and -19%).
* `dpm_solver++`: the same VP-SDE, DPM-Solver++(2M) in data-prediction form on a logSNR-uniform grid.
* `dpm_solver++_2s`: the same VP-SDE, singlestep DPM-Solver++(2S) on a time-uniform grid, each second-order step
  spanning two grid intervals with its intermediate evaluation at the middle grid time, and a first-order last step
  when the number of steps is odd: what the EDA authors sample with (their DPM_Solver.sample(order=2), default
  singlestep, time_uniform). `steps` counts network evaluations, as theirs does.
* `fm`: rectified flow x_t = (1 - t) x0 + t z with velocity target z - x0, Euler or Heun from t = 1 to 0.

Networks are called as `model(x, t, cond)` with `t` the network time in [0, 1] (discrete level k of T is k / T).
Every stochastic sampler step is a Gaussian N(mean, std^2 I) given by `step_distribution`, which `sample` itself
uses, so RL alignment can recompute exactly the log-probabilities of a stored chain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from common.runtime import UserError

SAMPLERS = ("ddpm", "ddim", "sm", "fm", "dpm_solver++", "dpm_solver++_2s")
PREDICTIONS = ("eps", "x0", "velocity")
SCHEDULES = ("cosine", "linear")
FM_SOLVERS = ("euler", "heun")
SDE_SOLVERS = ("exponential", "euler")
SPACINGS = ("uniform", "quadratic")
DISCRETE_SAMPLERS = ("ddpm", "ddim")
CONTINUOUS_VP_SAMPLERS = ("sm", "dpm_solver++", "dpm_solver++_2s")
DPM_SOLVERS = ("dpm_solver++", "dpm_solver++_2s")


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------
class VPSDE:
    """Linear VP-SDE: beta(t) = beta_min + t (beta_max - beta_min), x_t = alpha_t x0 + sigma_t z, alpha^2 + sigma^2 = 1.

    Methods take tensors (or floats) and return tensors of the same shape.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not 0 < beta_min < beta_max:
            raise UserError(f"VP-SDE needs 0 < beta_min < beta_max, got {beta_min} and {beta_max}")
        self.beta_min = beta_min
        self.beta_max = beta_max

    def log_alpha(self, t) -> Tensor:
        t = torch.as_tensor(t)
        return -(self.beta_max - self.beta_min) * t**2 / 4 - self.beta_min * t / 2

    def alpha(self, t) -> Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t) -> Tensor:
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def lambda_(self, t) -> Tensor:
        """Half log signal-to-noise ratio, log alpha - log sigma."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))

    def beta(self, t) -> Tensor:
        return self.beta_min + torch.as_tensor(t) * (self.beta_max - self.beta_min)

    def inverse_lambda(self, lam) -> Tensor:
        """Time t with lambda_(t) = lam (root of a quadratic in t, written in the cancellation-free form)."""
        log_alpha = -0.5 * torch.nn.functional.softplus(-2 * torch.as_tensor(lam))
        half_beta_min = self.beta_min / 2
        discriminant = half_beta_min**2 - (self.beta_max - self.beta_min) * log_alpha
        return -2 * log_alpha / (half_beta_min + torch.sqrt(discriminant))


def cosine_alphas_cumprod(T: int, s: float = 0.008) -> Tensor:
    """Improved-DDPM cosine schedule, T + 1 entries, index 0 = clean (1); per-step betas clipped at 0.999."""
    levels = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((levels + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def linear_alphas_cumprod(T: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> Tensor:
    """DDPM linear betas, rescaled by 1000 / T (as improved-DDPM does) so any T ends near pure noise; index 0 = 1."""
    scale = 1000.0 / T
    betas = torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), T, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


def gaussian_log_prob(x: Tensor, mean: Tensor, std: float, free_mask: Tensor | None = None) -> Tensor:
    """log N(x; mean, std^2 I) summed over all non-batch dims, counting only entries where `free_mask` is True."""
    log_density = -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
    if free_mask is not None:
        log_density = log_density * free_mask
    return log_density.flatten(1).sum(1)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts against a (B, ...) tensor."""
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


@dataclass
class SampleOutput:
    x0: Tensor  # final sample (B*n, ...)
    chain: Tensor | None  # (S' + 1, B*n, ...): latents from step start_step to the end, when return_chain
    log_probs: Tensor | None  # (S', B*n): Gaussian log-density of each step, 0 for deterministic steps
    stochastic: Tensor | None  # (S',) bool: which steps are stochastic
    cond: Tensor | None  # the (repeat_interleaved) conditioning actually used


# ---------------------------------------------------------------------------------------------------------------
# Diffusion
# ---------------------------------------------------------------------------------------------------------------
class Diffusion:
    """Forward process, training loss and sampler for one choice of `sampler` (see the module docstring).

    Deterministic steps: the last ddpm/ddim step (it lands on alpha_bar = 1, zero posterior variance), the last sm
    step (it returns its mean, no noise on the final sample), and every fm / dpm_solver++ / ddim(eta=0) step.

    `prediction` is what the network outputs: "eps" (noise), "x0" (clean data) or "velocity". For VP processes the
    velocity is alpha z - sigma x0 (Salimans & Ho); for fm it is z - x0 and is the only choice.

    `clip_x0`, when set, clamps the clean sample predicted at every sampler step to [-clip_x0, clip_x0].
    """

    def __init__(
        self,
        sampler: str,
        steps: int = 20,
        *,
        train_steps: int | None = None,
        schedule: str = "cosine",
        eta: float = 0.0,
        prediction: str | None = None,
        fm_solver: str = "euler",
        sde: VPSDE | None = None,
        t_min: float = 1e-3,
        clip_x0: float | None = None,
        sde_solver: str = "exponential",
        spacing: str = "uniform",
    ):
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if steps < 1:
            raise UserError(f"sampler steps must be >= 1, got {steps}")
        if schedule not in SCHEDULES:
            raise UserError(f"unknown noise schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if fm_solver not in FM_SOLVERS:
            raise UserError(f"unknown fm solver {fm_solver!r}; choose one of {', '.join(FM_SOLVERS)}")
        if spacing not in SPACINGS:
            raise UserError(f"unknown step spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
        if sde_solver not in SDE_SOLVERS:
            raise UserError(f"unknown sde solver {sde_solver!r}; choose one of {', '.join(SDE_SOLVERS)}")
        if fm_solver != "euler" and sampler != "fm":
            raise UserError(f"fm_solver={fm_solver!r} applies only to the fm sampler, not {sampler!r}")
        if eta < 0:
            raise UserError(f"eta must be >= 0, got {eta}")
        if eta != 0 and sampler != "ddim":
            raise UserError(f"eta applies only to the ddim sampler (ddpm is ddim with eta=1), not {sampler!r}")
        if not 0 < t_min < 1:
            raise UserError(f"t_min must be in (0, 1), got {t_min}")
        if clip_x0 is not None and clip_x0 <= 0:
            raise UserError(f"clip_x0 must be > 0 (or None for no clipping), got {clip_x0}")
        if sampler == "fm":
            if prediction not in (None, "velocity"):
                raise UserError(f"the fm sampler needs velocity prediction, got prediction={prediction!r}")
            prediction = "velocity"
        elif prediction is None:
            prediction = "eps"
        elif prediction not in PREDICTIONS:
            raise UserError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
        train_steps = steps if train_steps is None else train_steps
        if sampler in DISCRETE_SAMPLERS and train_steps < steps:
            raise UserError(f"train_steps ({train_steps}) must be >= sampling steps ({steps})")

        self.sampler = sampler
        self.steps = steps
        self.train_steps = train_steps
        self.schedule = schedule
        self.eta = 1.0 if sampler == "ddpm" else eta
        self.prediction = prediction
        self.fm_solver = fm_solver
        self.sde = sde if sde is not None else VPSDE()
        self.t_min = t_min
        self.clip_x0 = clip_x0
        self.sde_solver = sde_solver
        self.spacing = spacing
        self._alphas_cumprod_on: dict[torch.device, Tensor] = {}
        self._build_step_tables()

    # ----- schedule tables ---------------------------------------------------------------------------------------
    def _build_step_tables(self) -> None:
        """Per-step Python floats (the same for every sample), so a sampler step does no device table lookups.

        step_time / step_alpha / step_sigma have steps + 1 entries: the level before each step, then the final one;
        step_std has one entry per step (0 = deterministic step).
        """
        if self.sampler in DISCRETE_SAMPLERS:
            make = cosine_alphas_cumprod if self.schedule == "cosine" else linear_alphas_cumprod
            self.alphas_cumprod = make(self.train_steps)
            if self.spacing == "quadratic":  # denser near the data, where first-order steps lose the most
                fractions = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)[:-1] ** 2
                levels = torch.cat([1 + (fractions * (self.train_steps - 1)).round().long(), torch.zeros(1).long()])
                if not bool((levels[:-1] > levels[1:]).all()):
                    needed = self.steps**2 // 3 + 2
                    raise UserError(f"quadratic spacing of {self.steps} sampler steps needs about {needed} noise levels "
                                    f"(train_steps) or more, got {self.train_steps}")
            else:
                levels = torch.linspace(self.train_steps, 0, self.steps + 1, dtype=torch.float64).round().long()
            self.step_levels = levels.tolist()  # discrete noise level k before each step, then 0
            alpha_bar = self.alphas_cumprod[levels]
            now, nxt = alpha_bar[:-1], alpha_bar[1:]
            std = self.eta * torch.sqrt((1 - nxt) / (1 - now) * (1 - now / nxt))
            self.step_time = (levels.double() / self.train_steps).tolist()
            self.step_alpha = alpha_bar.sqrt().tolist()
            self.step_sigma = (1 - alpha_bar).sqrt().tolist()
            self.step_direction = (1 - nxt - std**2).clamp(min=0).sqrt().tolist()  # weight of eps_hat in the mean
            self.step_std = std.tolist()
            return
        if self.sampler == "fm":
            times = torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
            self.step_time = (times**2 if self.spacing == "quadratic" else times).tolist()
            self.step_std = [0.0] * self.steps
            return
        if self.sampler == "sm":
            times = torch.linspace(1.0, self.t_min, self.steps + 1, dtype=torch.float64)
            if self.sde_solver == "exponential":  # logSNR-uniform, like dpm_solver++: more steps near the data
                times = self.sde.inverse_lambda(torch.linspace(float(self.sde.lambda_(times[0])),
                                                               float(self.sde.lambda_(times[-1])), self.steps + 1,
                                                               dtype=torch.float64))
                times[0], times[-1] = 1.0, self.t_min
            if self.sde_solver == "euler":
                beta_width = self.sde.beta(times[:-1]) * (times[:-1] - times[1:])
                std = beta_width.sqrt()
                self.step_drift = beta_width.tolist()  # h beta(t)
            else:  # q(x_s | x_t, x0): alpha_ts = alpha_t / alpha_s, sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2
                alpha, sigma = self.sde.alpha(times), self.sde.sigma(times)
                alpha_ts = alpha[:-1] / alpha[1:]
                sigma_ts2 = sigma[:-1] ** 2 - alpha_ts**2 * sigma[1:] ** 2
                self.step_x_coef = (alpha_ts * sigma[1:] ** 2 / sigma[:-1] ** 2).tolist()
                self.step_x0_coef = (alpha[1:] * sigma_ts2 / sigma[:-1] ** 2).tolist()
                std = (sigma_ts2 * sigma[1:] ** 2 / sigma[:-1] ** 2).clamp(min=0).sqrt()
            std[-1] = 0.0  # the last step returns its mean: no fresh noise on the final sample
            self.step_std = std.tolist()
        elif self.sampler == "dpm_solver++_2s":  # uniform in time, as the EDA authors' solver
            times = torch.linspace(1.0, self.t_min, self.steps + 1, dtype=torch.float64)
            self.step_lambda = self.sde.lambda_(times).tolist()
            self.step_std = [0.0] * self.steps
        else:  # dpm_solver++: uniform in lambda = log(alpha / sigma)
            lambdas = torch.linspace(
                float(self.sde.lambda_(torch.tensor(1.0, dtype=torch.float64))),
                float(self.sde.lambda_(torch.tensor(self.t_min, dtype=torch.float64))),
                self.steps + 1,
                dtype=torch.float64,
            )
            times = self.sde.inverse_lambda(lambdas)
            times[0], times[-1] = 1.0, self.t_min  # remove round-off at the ends
            self.step_lambda = lambdas.tolist()
            self.step_std = [0.0] * self.steps
        self.step_time = times.tolist()
        self.step_alpha = self.sde.alpha(times).tolist()
        self.step_sigma = self.sde.sigma(times).tolist()

    def _alphas_cumprod(self, device: torch.device) -> Tensor:
        """Discrete table on `device`, float32, cached per device."""
        if device not in self._alphas_cumprod_on:
            self._alphas_cumprod_on[device] = self.alphas_cumprod.to(device=device, dtype=torch.float32)
        return self._alphas_cumprod_on[device]

    @property
    def stochastic(self) -> bool:
        """Does sampling take Gaussian steps (ddpm, ddim with eta > 0, sm)?"""
        return any(std > 0 for std in self.step_std)

    @property
    def num_sample_steps(self) -> int:
        """Number of sampler steps S (network calls: S, or 2 S for fm with Heun)."""
        return self.steps

    def noise_levels(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Network time (B,) -> (alpha, sigma), each (B,), with x_t = alpha x0 + sigma z."""
        if self.sampler in DISCRETE_SAMPLERS:
            levels = (t * self.train_steps).round().long()
            alpha_bar = self._alphas_cumprod(t.device)[levels].to(t.dtype)
            return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if self.sampler == "fm":
            return 1 - t, t
        return self.sde.alpha(t), self.sde.sigma(t)

    # ----- training ----------------------------------------------------------------------------------------------
    def sample_train_time(self, batch: int, device) -> Tensor:
        """Network time for training: k / T with k ~ U{1..T} (discrete), U(t_min, 1) (VP-SDE), U(0, 1) (fm)."""
        if self.sampler in DISCRETE_SAMPLERS:
            levels = torch.randint(1, self.train_steps + 1, (batch,), device=device)
            return levels.float() / self.train_steps
        low = 0.0 if self.sampler == "fm" else self.t_min
        return low + (1 - low) * torch.rand(batch, device=device)

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        alpha, sigma = self.noise_levels(t)
        return _per_sample(alpha, x0) * x0 + _per_sample(sigma, x0) * noise

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        if self.sampler == "fm":
            return noise - x0
        alpha, sigma = self.noise_levels(t)
        return _per_sample(alpha, x0) * noise - _per_sample(sigma, x0) * x0

    def _noisy_input(self, x0, t, noise, known):
        x_t = self.add_noise(x0, t, noise)
        return x_t if known is None else torch.where(known, x0, x_t)

    def loss(self, model, x0, cond=None, *, mask=None, known=None, t=None, noise=None) -> Tensor:
        """Per-sample mean squared error of the prediction (B,); `mask` selects the entries that count, `known`
        entries are in-painted (clean values) in the network input."""
        t = self.sample_train_time(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        prediction = model(self._noisy_input(x0, t, noise, known), t, cond)
        return _masked_mean((prediction - self.training_target(x0, noise, t)) ** 2, mask)

    def eps_error(self, model, x0, cond, t, noise, *, mask=None, known=None) -> Tensor:
        """Per-sample mean of (eps - eps_hat)^2 (B,), with x0 / velocity outputs converted to the implied noise."""
        return _masked_mean((self.predicted_noise(model, x0, cond, t, noise, known=known) - noise) ** 2, mask)

    def predicted_noise(self, model, x0, cond, t, noise, *, known=None) -> Tensor:
        """eps_hat of `model` at x_t = alpha_t x0 + sigma_t noise (known entries in-painted), whatever it predicts."""
        x_t = self._noisy_input(x0, t, noise, known)
        return self._predict_noise(model(x_t, t, cond), x_t, t)

    def _predict_noise(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.prediction == "eps":
            return prediction
        if self.sampler == "fm":  # x_t = (1 - t) x0 + t z and v = z - x0  =>  z = x_t + (1 - t) v
            return x_t + _per_sample(1 - t, x_t) * prediction
        alpha, sigma = (_per_sample(level, x_t) for level in self.noise_levels(t))
        return self._noise_from_output(prediction, x_t, alpha, sigma)

    def _split(self, prediction: Tensor, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        """VP network output at scalar levels (alpha, sigma) -> (x0_hat, eps_hat)."""
        if self.prediction == "eps":
            return (x - sigma * prediction) / alpha, prediction
        if self.prediction == "x0":
            return prediction, (x - alpha * prediction) / sigma
        return alpha * x - sigma * prediction, sigma * x + alpha * prediction

    def _noise_from_output(self, prediction: Tensor, x: Tensor, alpha, sigma) -> Tensor:
        """VP network output -> eps_hat alone; alpha, sigma are floats or tensors broadcastable to x."""
        if self.prediction == "eps":
            return prediction
        if self.prediction == "x0":
            return (x - alpha * prediction) / sigma
        return sigma * x + alpha * prediction

    # ----- sampling ----------------------------------------------------------------------------------------------
    def _network_time(self, value: float, x: Tensor) -> Tensor:
        return torch.full((x.shape[0],), value, device=x.device, dtype=x.dtype)

    def step_distribution(self, model, x: Tensor, step: int, cond) -> tuple[Tensor, float]:
        """(mean, std) of sampler step `step` (0-based in sampling order) from latent x; std == 0 means the step is
        deterministic. dpm_solver++ is multistep (its update needs the previous prediction), so it has none."""
        if not 0 <= step < self.steps:
            raise UserError(f"step {step} out of range for a {self.steps}-step sampler")
        if self.sampler in DPM_SOLVERS:
            raise UserError(f"{self.sampler} is a deterministic solver; it has no per-step distribution")
        if self.clip_x0 is not None:
            model = self.with_clipped_x0(model)
        if self.sampler in DISCRETE_SAMPLERS:
            alpha, sigma = self.step_alpha[step], self.step_sigma[step]
            output = model(x, self._network_time(self.step_time[step], x), cond)
            x0_hat, eps_hat = self._split(output, x, alpha, sigma)
            mean = self.step_alpha[step + 1] * x0_hat + self.step_direction[step] * eps_hat
            return mean, self.step_std[step]
        if self.sampler == "sm":
            alpha, sigma = self.step_alpha[step], self.step_sigma[step]
            output = model(x, self._network_time(self.step_time[step], x), cond)
            if self.sde_solver == "exponential":  # the mean of q(x_s | x_t, x0 = x0_hat)
                x0_hat, _ = self._split(output, x, alpha, sigma)
                return self.step_x_coef[step] * x + self.step_x0_coef[step] * x0_hat, self.step_std[step]
            # Euler-Maruyama: x - h f + h g^2 score, with f = -beta x / 2, g^2 = beta, score = -eps / sigma
            eps_hat = self._noise_from_output(output, x, alpha, sigma)
            drift = self.step_drift[step]
            return x + drift * (0.5 * x - eps_hat / sigma), self.step_std[step]
        now, nxt = self.step_time[step], self.step_time[step + 1]
        velocity = model(x, self._network_time(now, x), cond)
        euler = x - (now - nxt) * velocity
        if self.fm_solver == "euler":
            return euler, 0.0
        velocity_end = model(euler, self._network_time(nxt, x), cond)
        return x - (now - nxt) * 0.5 * (velocity + velocity_end), 0.0

    def with_clipped_x0(self, model):
        """`model` with its output replaced by the one that implies the clean sample clamped to [-clip_x0, clip_x0]
        (Diffusion Policy's clip_sample). Early steps of a discrete schedule have alpha ~ 0, where
        x0_hat = (x - sigma eps_hat) / alpha turns small prediction errors into huge samples. The final samples of
        ddpm, ddim and fm (Euler) lie in the box, since their last step returns x0_hat; sm and dpm_solver++ only
        clip the prediction of each step."""
        bound = self.clip_x0

        def clipped(x: Tensor, t: Tensor, cond):
            prediction = model(x, t, cond)
            if self.prediction == "x0":
                return prediction.clamp(-bound, bound)
            shape = (-1,) + (1,) * (x.dim() - 1)
            if self.sampler == "fm":  # x_t = (1 - t) x0 + t z, v = z - x0
                t = t.reshape(shape)
                return (x - (x - t * prediction).clamp(-bound, bound)) / t
            alpha, sigma = (level.reshape(shape) for level in self.noise_levels(t))
            if self.prediction == "eps":
                return (x - alpha * ((x - sigma * prediction) / alpha).clamp(-bound, bound)) / sigma
            return (alpha * x - (alpha * x - sigma * prediction).clamp(-bound, bound)) / sigma  # VP velocity

        return clipped

    def _dpm_solver_step(self, model, x, step, cond, previous_x0):
        """DPM-Solver++(2M) from step_time[step] to step_time[step + 1]; first order when there is no history."""
        if self.clip_x0 is not None:
            model = self.with_clipped_x0(model)
        alpha, sigma = self.step_alpha[step], self.step_sigma[step]
        output = model(x, self._network_time(self.step_time[step], x), cond)
        x0_hat, _ = self._split(output, x, alpha, sigma)
        h = self.step_lambda[step + 1] - self.step_lambda[step]
        data_term = x0_hat
        if previous_x0 is not None:
            ratio = (self.step_lambda[step] - self.step_lambda[step - 1]) / h
            data_term = (1 + 0.5 / ratio) * x0_hat - (0.5 / ratio) * previous_x0
        x_next = (self.step_sigma[step + 1] / sigma) * x - self.step_alpha[step + 1] * math.expm1(-h) * data_term
        return x_next, x0_hat

    def _dpm_solver_2s_step(self, model, x, step, cond) -> tuple[Tensor, int]:
        """Singlestep DPM-Solver++(2S) from grid point `step` over two intervals (the middle grid time is the
        intermediate point), or DPM-Solver++(1) over the last interval; returns (x, grid points advanced)."""
        if self.clip_x0 is not None:
            model = self.with_clipped_x0(model)
        alpha, sigma, lam = self.step_alpha[step], self.step_sigma[step], self.step_lambda[step]
        x0_hat, _ = self._split(model(x, self._network_time(self.step_time[step], x), cond), x, alpha, sigma)
        if step + 2 > self.steps:  # first order: x_t = (sigma_t / sigma_s) x - alpha_t expm1(-h) x0
            h = self.step_lambda[step + 1] - lam
            return (self.step_sigma[step + 1] / sigma) * x - self.step_alpha[step + 1] * math.expm1(-h) * x0_hat, 1
        h = self.step_lambda[step + 2] - lam
        r1 = (self.step_lambda[step + 1] - lam) / h
        middle = (self.step_sigma[step + 1] / sigma) * x - self.step_alpha[step + 1] * math.expm1(-r1 * h) * x0_hat
        middle_output = model(middle, self._network_time(self.step_time[step + 1], x), cond)
        middle_x0, _ = self._split(middle_output, middle, self.step_alpha[step + 1], self.step_sigma[step + 1])
        data_term = x0_hat + (0.5 / r1) * (middle_x0 - x0_hat)
        return (self.step_sigma[step + 2] / sigma) * x - self.step_alpha[step + 2] * math.expm1(-h) * data_term, 2

    def sample(
        self,
        model,
        shape: tuple,
        cond=None,
        *,
        samples_per_cond: int = 1,
        inpaint_mask=None,
        inpaint_values=None,
        return_chain: bool = False,
        grad_last_k: int | None = None,
        x_start=None,
        start_step: int = 0,
        generator=None,
    ) -> SampleOutput:
        """Draw samples (see SampleOutput). Random draws, in order: x_T (unless x_start), then one noise tensor per
        stochastic step, all from `generator`.

        x_start continues a chain from its latent before step `start_step`; it is (B*n, ...), or (B, ...) with one
        latent per condition that is repeated for the n samples (branching). The chain, log_probs and stochastic then
        cover steps start_step.. only; dpm_solver++ restarts its multistep history with a first-order step.
        Step log-probs are densities of the detached sample, so their gradient is the score-function (REINFORCE) one.
        """
        if samples_per_cond < 1:
            raise UserError(f"samples_per_cond must be >= 1, got {samples_per_cond}")
        if not 0 <= start_step <= self.steps:
            raise UserError(f"start_step {start_step} out of range for a {self.steps}-step sampler")
        if grad_last_k is not None and grad_last_k < 0:
            raise UserError(f"grad_last_k must be >= 0, got {grad_last_k}")
        if (inpaint_mask is None) != (inpaint_values is None):
            raise UserError("in-painting needs both inpaint_mask and inpaint_values")
        if cond is not None:
            cond = cond.repeat_interleave(samples_per_cond, dim=0)
            shape = (cond.shape[0], *shape)
        else:
            shape = (shape[0] * samples_per_cond, *shape[1:])
        device = _pick_device(model, cond, inpaint_values, x_start)
        free_mask = None
        if inpaint_mask is not None:
            inpaint_mask = inpaint_mask.to(device=device, dtype=torch.bool).repeat_interleave(samples_per_cond, 0)
            inpaint_values = inpaint_values.to(device).repeat_interleave(samples_per_cond, 0)
            free_mask = (~inpaint_mask).to(torch.get_default_dtype())

        def inpaint(x):
            return x if inpaint_mask is None else torch.where(inpaint_mask, inpaint_values.to(x.dtype), x)

        if x_start is None:
            x = torch.randn(shape, device=device, generator=generator)
        elif tuple(x_start.shape) == tuple(shape):
            x = x_start
        elif samples_per_cond > 1 and x_start.shape[0] * samples_per_cond == shape[0]:
            x = x_start.repeat_interleave(samples_per_cond, dim=0)  # branch several continuations per latent
        else:
            raise UserError(f"x_start has shape {tuple(x_start.shape)}, expected {tuple(shape)}")
        x = inpaint(x)
        chain, log_probs = [x], []
        first_grad_step = 0 if grad_last_k is None else self.steps - grad_last_k
        grad_mode = torch.is_grad_enabled()
        previous_x0 = None
        if self.sampler == "dpm_solver++_2s":
            if return_chain or grad_last_k is not None or start_step:
                raise UserError("dpm_solver++_2s samples only whole chains without gradients or history")
            step = 0
            while step < self.steps:
                x, advanced = self._dpm_solver_2s_step(model, x, step, cond)
                x, step = inpaint(x), step + advanced
            return SampleOutput(x0=x, chain=None, log_probs=None, stochastic=None, cond=cond)
        for step in range(start_step, self.steps):
            if step == first_grad_step and grad_last_k is not None:
                x = x.detach()
            with torch.set_grad_enabled(grad_mode and step >= first_grad_step):
                if self.sampler == "dpm_solver++":
                    x, previous_x0 = self._dpm_solver_step(model, x, step, cond, previous_x0)
                    log_prob = None
                else:
                    mean, std = self.step_distribution(model, x, step, cond)
                    log_prob = None
                    if std > 0:
                        noise = torch.randn(mean.shape, device=device, generator=generator, dtype=mean.dtype)
                        x = mean + std * noise
                        if return_chain:  # density of the sample taken as data: its gradient is the score-function one
                            log_prob = gaussian_log_prob(x.detach(), mean, std, free_mask)
                    else:
                        x = mean
                x = inpaint(x)
            if return_chain:
                chain.append(x)
                log_probs.append(log_prob if log_prob is not None else x.new_zeros(x.shape[0]))
        if not return_chain:
            return SampleOutput(x0=x, chain=None, log_probs=None, stochastic=None, cond=cond)
        stochastic = torch.tensor([std > 0 for std in self.step_std[start_step:]], dtype=torch.bool, device=device)
        empty = x.new_zeros(0, x.shape[0])
        return SampleOutput(
            x0=x,
            chain=torch.stack(chain),
            log_probs=torch.stack(log_probs) if log_probs else empty,
            stochastic=stochastic,
            cond=cond,
        )


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over non-batch dims, over the entries where `mask` is nonzero when given."""
    if mask is None:
        return values.flatten(1).mean(1)
    weights = mask.to(values.dtype).expand_as(values).flatten(1)
    return (values.flatten(1) * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _pick_device(model, *tensors) -> torch.device:
    """Device of the first given tensor, else of the model's parameters, else CPU."""
    for tensor in tensors:
        if tensor is not None:
            return tensor.device
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")
