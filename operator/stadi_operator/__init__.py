"""Control plane: kopf operator, cluster GPU inventory, pod-group builder, node agent."""
