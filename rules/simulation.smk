def simulation_targets():
    return []
