"""Explanation-quality metrics, pure PyTorch and batched (no pipeline code).

    from saliency_audit.explainers.metrics import deletion_auc, insertion_auc, random_maps
    d = deletion_auc(model, images, maps, targets, seeds=seeds)            # [B], lower is better
    d_ref = deletion_auc(model, images, random_maps(maps.shape, seeds), targets, seeds=seeds)

Shapes follow the explainer interface: images [B,C,H,W] in model-input space, maps [B,H,W]
(raw, signed, channels summed), targets [B] class indices, the model returns logits [B,K].
Model-based metrics push all perturbed copies through the model in chunks of at most
``max_forward_batch`` images, under torch.inference_mode, on ``images.device``. Anything
random depends only on each image's seed, never on the rest of the batch.

- causal: RISE deletion / insertion curves and AUCs (several methods' in shared forward chunks), the
  random-order reference.
- complexity: Gini sparsity.
- abele: ABELE's relevance flip rate, Lipschitz coherence / stability, salt-and-pepper copies.
- road: ROAD (Rong et al. 2022), MoRF and LeRF curves with noisy linear imputation.
- localisation: pointing game, relevance mass and rank accuracy against ground-truth masks.
- sanity: Adebayo et al.'s cascading randomisation, the random logit test's classes, Spearman rank
  correlation, SSIM.

The explain step's per-image metrics plug in through one registry (registry.py): each is a class
beside its computation (causal.DeletionInsertion, abele_protocol.AbeleMetrics, road.Road,
localisation.Localisation) that declares its columns, options, cost and convention.
"""
# The per-image metrics register in this order, the order of their columns in the rows.
from saliency_audit.explainers.metrics import causal  # noqa: F401,I001
from saliency_audit.explainers.metrics import abele_protocol  # noqa: F401,I001
from saliency_audit.explainers.metrics import road as _road  # noqa: F401,I001  (the module; `road` is its function)
from saliency_audit.explainers.metrics import localisation  # noqa: F401,I001
from saliency_audit.explainers.metrics.registry import (Metric, MetricBatch, enabled_metrics, metric_class,
                                                        metric_classes, metric_columns, metric_costs,
                                                        metric_forward_passes, metric_options, register_metric)
from saliency_audit.explainers.metrics.abele import (
    ABELE_PERCENTILES,
    lipschitz_ratios,
    prediction_unchanged,
    relevance_flip_rate,
    salt_and_pepper,
)
from saliency_audit.explainers.metrics.causal import (
    SUBSTRATES,
    auc,
    blur_substrate,
    causal_curves,
    default_steps,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    make_substrate,
    pixel_ranks,
    random_maps,
)
from saliency_audit.explainers.metrics.complexity import gini
from saliency_audit.explainers.metrics.localisation import (
    LocalisationScores,
    pointing_game,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from saliency_audit.explainers.metrics.road import (
    DEFAULT_PERCENTAGES,
    RoadCurves,
    linear_imputation,
    noisy_linear_imputation,
    road,
)
from saliency_audit.explainers.metrics.sanity import (
    average_ranks,
    cascading_randomization,
    parameterised_layers,
    random_other_classes,
    reinitialise_,
    sanity_rank_correlation,
    spearman_rank_correlation,
    ssim,
)

__all__ = [
    "Metric", "MetricBatch", "enabled_metrics", "metric_class", "metric_classes", "metric_columns", "metric_costs",
    "metric_forward_passes", "metric_options", "register_metric",
    "ABELE_PERCENTILES", "DEFAULT_PERCENTAGES", "LocalisationScores", "RoadCurves", "linear_imputation",
    "noisy_linear_imputation", "pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy", "road", "SUBSTRATES", "auc", "average_ranks", "blur_substrate", "cascading_randomization", "causal_curves",
    "default_steps", "deletion_auc", "deletion_curve", "gini", "insertion_auc", "insertion_curve",
    "lipschitz_ratios", "make_substrate", "parameterised_layers", "pixel_ranks", "prediction_unchanged",
    "random_maps", "random_other_classes", "reinitialise_", "relevance_flip_rate", "salt_and_pepper", "sanity_rank_correlation",
    "spearman_rank_correlation",
    "ssim",
]
