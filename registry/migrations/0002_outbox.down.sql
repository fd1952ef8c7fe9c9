DROP TABLE registry.outbox;
