"""Dense-prediction adapters (segmenters with exit heads); each module registers its adapter on import."""
