"""Images in: the embedded generator, the ImageNet layout and its boxes, decoding, the loaders."""
