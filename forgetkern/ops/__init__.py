"""torch.library ops (namespace ``forgetkern``): schema, fake impl, autograd and backend dispatch per op."""
