"""Code shared by the fedpersona ServerApp, ClientApp and simulations."""
