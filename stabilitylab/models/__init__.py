"""Models: the timm ViT backbone, the MLP heads and the layer-group names."""
