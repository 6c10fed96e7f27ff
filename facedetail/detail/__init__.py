"""The Deep Facial Detail Net: networks, SH shading, losses and training of the displacement generator."""
