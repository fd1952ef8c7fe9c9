DROP TABLE registry.agents;
