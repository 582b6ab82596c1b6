"""TensorRT: the strongly typed engine builder and the manifest that guards each engine."""
