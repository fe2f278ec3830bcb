"""``fedrpc simulate``: federated training of simulated devices through a real fedrpc server.

``digits`` is the task (data, partitions, network, local training), ``run`` drives
the rounds with :class:`fedrpc.client.DeviceAgent` devices, ``command`` is the CLI.
"""
