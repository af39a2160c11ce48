require ["fileinto", "copy", "imap4flags", "relational", "comparator-i;ascii-numeric"];
if address :is :domain "from" "lists.example.org" {
  fileinto :copy :flags ["\\Seen", "$List"] "Lists";
  stop;
} elsif anyof (header :contains "x-spam-flag" "YES", header :value "ge" :comparator "i;ascii-numeric" "x-spam-score" "5") {
  addflag "\\Flagged";
  fileinto "Junk";
} else {
  keep :flags "\\Recent";
}
