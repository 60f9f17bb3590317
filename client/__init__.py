"""The fedpersona device side: Flower ClientApp and the device's own state."""
