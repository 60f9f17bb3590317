"""The fedpersona coordinator: Flower ServerApp, strategy and run outputs."""
