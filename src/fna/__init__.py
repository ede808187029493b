"""FNA: fast neural network adaptation."""
