// Command postern_go connects through the relay's MySQL listener with go-sql-driver/mysql and
// the tls.Config that README.md documents, logs in as `app`, runs one query and prints its
// result.
//
// Usage (in a directory holding ca.pem, client-alice.pem, client-alice-key.pem):
//
//	postern_go HOST PORT PASSWORD [plain]
//
// `plain` connects without TLS. Exit status 0 with the result on stdout, or 1 with the driver's
// error on stderr.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/go-sql-driver/mysql"
)

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: postern_go HOST PORT PASSWORD [plain]")
		os.Exit(2)
	}
	plain := len(os.Args) > 4 && os.Args[4] == "plain"
	result, err := run(os.Args[1], os.Args[2], os.Args[3], plain)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(result)
}

func run(host, port, password string, plain bool) (string, error) {
	pool := x509.NewCertPool()
	caPEM, err := os.ReadFile("ca.pem")
	if err != nil {
		return "", err
	}
	if !pool.AppendCertsFromPEM(caPEM) {
		return "", errors.New("ca.pem holds no certificate")
	}
	cert, err := tls.LoadX509KeyPair("client-alice.pem", "client-alice-key.pem")
	if err != nil {
		return "", err
	}
	err = mysql.RegisterTLSConfig("postern", &tls.Config{
		RootCAs:      pool,
		Certificates: []tls.Certificate{cert},
		ServerName:   host, // checked against the relay's certificate
	})
	if err != nil {
		return "", err
	}
	params := "?tls=postern"
	if plain {
		params = ""
	}
	dsn := fmt.Sprintf("app:%s@tcp(%s)/shop%s", password, net.JoinHostPort(host, port), params)
	db, err := sql.Open("mysql", dsn)
	if err != nil {
		return "", err
	}
	defer db.Close()
	var result string
	err = db.QueryRow("SELECT CONCAT_WS(' ', CURRENT_USER(), DATABASE(), 6 * 7)").Scan(&result)
	return result, err
}
