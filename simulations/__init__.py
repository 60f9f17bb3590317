"""Local multi-client simulations: presets and the `fedpersona simulate` driver."""
