"""Feature dashboards: what makes each feature fire, what it writes, how much of it comes from context.

:func:`collect_dashboard` gathers the data in one streaming pass over an activation cache
(:mod:`mtsae.features.stats`), :func:`write_site` writes it as a static site that opens offline;
``mtsae features`` (:mod:`mtsae_app.features`) runs both for a trained SAE.
"""

from mtsae.features.attribution import ContextAttribution, context_attribution
from mtsae.features.collect import DashboardTruth, FeaturesConfig, collect_dashboard, select_features
from mtsae.features.logits import LogitEffects, logit_effects
from mtsae.features.site import write_site
from mtsae.features.stats import FeatureStats, PowerOfTwoHistogram, StreamingTopK

__all__ = [
    "ContextAttribution",
    "FeatureStats",
    "FeaturesConfig",
    "DashboardTruth",
    "LogitEffects",
    "PowerOfTwoHistogram",
    "StreamingTopK",
    "collect_dashboard",
    "context_attribution",
    "logit_effects",
    "select_features",
    "write_site",
]
