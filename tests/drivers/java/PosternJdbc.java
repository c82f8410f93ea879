// Connects through the relay's MySQL listener with MariaDB Connector/J and the JDBC URL that
// README.md documents (given whole as the first argument, as an application's configuration
// would give it), logs in as `app`, runs one query and prints its result.
//
// Usage: java -cp CLASSES:mariadb-java-client.jar PosternJdbc URL PASSWORD
// Exit status 0 with the result on stdout, or 1 with the driver's error (and its causes) on
// stderr.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;

public class PosternJdbc {
    public static void main(String[] args) {
        String url = args[0];
        String password = args[1];
        try (Connection conn = DriverManager.getConnection(url, "app", password);
                Statement stmt = conn.createStatement();
                ResultSet rs = stmt.executeQuery(
                        "SELECT CONCAT_WS(' ', CURRENT_USER(), DATABASE(), 6 * 7)")) {
            rs.next();
            System.out.println(rs.getString(1));
        } catch (SQLException e) {
            // The cause chain carries the TLS reason (e.g. the certificate's names).
            for (Throwable t = e; t != null; t = t.getCause()) {
                System.err.println(t);
            }
            System.exit(1);
        }
    }
}
