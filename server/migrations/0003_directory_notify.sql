-- Issue 16: live functions read streams, memberships and revoked links from
-- an in-memory directory; every change to those tables tells all nodes to
-- reload it (LISTEN returnfeed_directory). Statement-level, so a bulk change
-- sends one notification; PostgreSQL delivers it only on commit and folds
-- duplicates within one transaction.
CREATE FUNCTION returnfeed_directory_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('returnfeed_directory', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER streams_directory_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON streams
    FOR EACH STATEMENT EXECUTE FUNCTION returnfeed_directory_notify();
CREATE TRIGGER productions_directory_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON productions
    FOR EACH STATEMENT EXECUTE FUNCTION returnfeed_directory_notify();
CREATE TRIGGER production_members_directory_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON production_members FOR EACH STATEMENT EXECUTE FUNCTION returnfeed_directory_notify();
CREATE TRIGGER revoked_links_directory_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON revoked_links
    FOR EACH STATEMENT EXECUTE FUNCTION returnfeed_directory_notify();
