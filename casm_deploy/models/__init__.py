"""The networks: the classifier's encoder and head, the mapping's decoder, the backbones."""
